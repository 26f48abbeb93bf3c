"""torch.library custom ops: fastpref's ops inside a torch.compile graph, forward and backward, without a break.

Imported on the first compiled call (``fastpref.ops.compiling``), not with fastpref: registering costs ~4 ms an
op. Each public function here stands in for an autograd Function's ``apply`` of ``fastpref.ops`` (same
arguments, same results), through custom ops whose implementations are those Functions' passes:

- ``*_fwd`` / ``*_bwd`` (token_logprobs, linear_logprobs, token_divergence, linear_token_divergence): the
  forward op has a fake (shape) implementation and ``register_autograd``, whose backward calls the ``*_bwd`` op;
- the losses that compute their head gradients in the forward (linear_dpo_loss, linear_ppo_loss): a ``*_pass``
  op returns the per-sequence or per-token log-probs with the gradients, the traced PyTorch code computes the
  loss and metrics from them, and ``head_grads`` carries the gradients: a zero added to the loss, whose
  backward scales them by the loss's gradient (one multiply the eager path skips when that gradient is 1).

A custom op returns tensors only: what an autograd Function leaves None comes back as an empty tensor. The
label value check runs in the forward ops (it needs the data, which tracing does not have).
The float arguments (temperature, beta, kl_coef, ...) travel as one float64 CPU tensor (``_scalars``): a
``float`` in a custom op's schema is specialized, so a value that changes between calls (a KL controller's
coefficient, a temperature schedule) would recompile the graph on every new value.
The Triton kernels stay opaque (``custom_op``, not ``triton_op``): ``triton_op`` traces its body, and these
bodies decide on the host from the data (kept rows, chunks, pair boundaries) and launch through launchers
that do not go through ``wrap_triton``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastpref import _backends
from fastpref._validate import check_label_values
from fastpref.ops import divergence, linear_policy, linear_preference, logprobs

_F32 = torch.float32


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, family: str) -> str:
    """``_backends.resolve`` as torch.compile sees it: a constant of its arguments (tracing it would break the graph
    at the compiled extension's ``build_info``). Here, not in ``fastpref.ops``: the decorator imports Dynamo."""
    return _backends.resolve(backend, device, family)


def _scalars(*values):
    """Float arguments as a float64 CPU tensor, None as NaN: traced as tensor arithmetic, so that Dynamo keeps a
    changing value symbolic (``torch.tensor`` of the values, like a ``float`` argument, specializes each one)."""
    return torch.stack([torch.ones((), dtype=torch.float64) * (math.nan if v is None else v) for v in values])


def _floats(t):
    """``_scalars``' values back, inside an op's implementation."""
    return [None if math.isnan(v) else v for v in t.tolist()]


def _or_empty(t, like):
    return like.new_empty(0) if t is None else t


def _empty_unless(flag, make, like):
    return make() if flag else like.new_empty(0)


def _nones(values, keep):
    return tuple(v if k else None for v, k in zip(values, keep))


def _head_fakes(hidden, weight, bias, need):
    """Fake head gradients, laid out as ``HeadGrads.result`` returns them."""
    return (_empty_unless(need[0], lambda: torch.empty_like(hidden), hidden),
            _empty_unless(need[1], lambda: weight.new_empty(weight.shape), weight),
            _empty_unless(need[2], lambda: bias.new_empty(bias.shape), weight))


def _needs(cfg, *tensors):
    """Which tensors need a gradient: the pass ops see them detached (no autograd of their own)."""
    return [t is not None and t.requires_grad and cfg["grad"] for t in tensors]


def _detached(*tensors):
    return tuple(None if t is None else t.detach() for t in tensors)


_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView)


def _autograd_inside():
    """A context in which autograd records again inside a custom op's implementation, which runs below the
    Autograd dispatch key: the fused losses' passes differentiate each chunk's per-token or per-sequence loss
    (a few small vectors) with ``torch.autograd.grad``, as their autograd Functions do."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


# token_logprobs

@torch.library.custom_op("fastpref::token_logprobs_fwd", mutates_args=())
def _token_fwd(logits: Tensor, labels: Tensor, temperature: Tensor, ignore_index: int, with_entropy: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_label_values(labels, logits.shape[-1], ignore_index)
    (temperature,) = _floats(temperature)
    logp, lse, entropy = logprobs.token_forward(logits, labels, temperature, ignore_index, with_entropy, backend)
    return logp, lse, _or_empty(entropy, lse)


@_token_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, backend):
    return (logits.new_empty(labels.shape, dtype=_F32), logits.new_empty(labels.numel(), dtype=_F32),
            logits.new_empty(labels.shape if with_entropy else (0,), dtype=_F32))


@torch.library.custom_op("fastpref::token_logprobs_bwd", mutates_args=())
def _token_bwd(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Optional[Tensor], grad_logp: Optional[Tensor],
               grad_entropy: Optional[Tensor], temperature: Tensor, ignore_index: int, backend: str) -> Tensor:
    (temperature,) = _floats(temperature)
    return logprobs.token_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
                                   backend)


@_token_bwd.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _token_setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, backend = inputs
    ctx.save_for_backward(logits, labels, output[1], output[2] if with_entropy else None)
    ctx.args = temperature, ignore_index, backend


def _token_backward(ctx, grad_logp, _grad_lse, grad_entropy):
    logits, labels, lse, entropy = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _token_bwd(logits, labels, lse, entropy, grad_logp, None if entropy is None else grad_entropy,
                          *ctx.args)
    return grad, None, None, None, None, None


_token_fwd.register_autograd(_token_backward, setup_context=_token_setup)


def token_logprobs(logits, labels, temperature, ignore_index, with_entropy, backend):
    """``TokenLogprobsFunction.apply`` under torch.compile."""
    logp, _, entropy = _token_fwd(logits, labels, _scalars(temperature), ignore_index, with_entropy, backend)
    return (logp, entropy) if with_entropy else logp


# linear_logprobs

@torch.library.custom_op("fastpref::linear_logprobs_fwd", mutates_args=())
def _linear_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, scalars: Tensor,
                ignore_index: int, with_entropy: bool, chunk_size: Optional[int],
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_label_values(labels, weight.shape[0], ignore_index)
    temperature, softcap = _floats(scalars)
    logp, lse, entropy, _ = logprobs.linear_forward(hidden, weight, bias, labels, temperature, softcap, ignore_index,
                                                    with_entropy, chunk_size, backend)
    return logp, lse, _or_empty(entropy, lse)


@_linear_fwd.register_fake
def _(hidden, weight, bias, labels, scalars, ignore_index, with_entropy, chunk_size, backend):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=_F32), hidden.new_empty(n, dtype=_F32),
            hidden.new_empty(n if with_entropy else 0, dtype=_F32))


@torch.library.custom_op("fastpref::linear_logprobs_bwd", mutates_args=())
def _linear_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                entropy: Optional[Tensor], grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                need: list[bool], scalars: Tensor, ignore_index: int, chunk_size: Optional[int],
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    temperature, softcap = _floats(scalars)
    grads = logprobs.linear_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, need,
                                     temperature, softcap, ignore_index, chunk_size, backend)
    return tuple(_or_empty(g, weight) for g in grads)


@_linear_bwd.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, need, scalars, ignore_index, chunk_size,
      backend):
    return _head_fakes(hidden, weight, bias, need)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, scalars, ignore_index, with_entropy, chunk_size, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1], output[2] if with_entropy else None)
    ctx.args = scalars, ignore_index, chunk_size, backend


def _linear_backward(ctx, grad_logp, _grad_lse, grad_entropy):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:3])
    grads = (None, None, None)
    if any(need):
        grads = _nones(_linear_bwd(hidden, weight, bias, labels, lse, entropy, grad_logp,
                                   None if entropy is None else grad_entropy, need, *ctx.args), need)
    return *grads, *[None] * 6


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_logprobs(hidden, weight, bias, labels, temperature, softcap, ignore_index, with_entropy, chunk_size,
                    backend):
    """``LinearLogprobsFunction.apply`` under torch.compile."""
    logp, _, entropy = _linear_fwd(hidden, weight, bias, labels, _scalars(temperature, softcap), ignore_index,
                                   with_entropy, chunk_size, backend)
    return (logp, entropy) if with_entropy else logp


# token_divergence

@torch.library.custom_op("fastpref::token_divergence_fwd", mutates_args=())
def _div_fwd(logits: Tensor, ref_logits: Tensor, labels: Optional[Tensor], div_id: int, scalars: Tensor,
             ignore_index: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if labels is not None:
        check_label_values(labels, logits.shape[-1], ignore_index)
    param, temperature = _floats(scalars)
    kw = dict(div_id=div_id, param=param, temperature=temperature, ignore_index=ignore_index)
    return divergence.token_div_forward(logits, ref_logits, labels, kw, backend)


@_div_fwd.register_fake
def _(logits, ref_logits, labels, div_id, scalars, ignore_index, backend):
    n = logits.numel() // logits.shape[-1]
    return logits.new_empty(logits.shape[:-1], dtype=_F32), *(logits.new_empty(n, dtype=_F32) for _ in range(4))


@torch.library.custom_op("fastpref::token_divergence_bwd", mutates_args=())
def _div_bwd(logits: Tensor, ref_logits: Tensor, labels: Optional[Tensor], lse: Tensor, lse_r: Tensor, s_a: Tensor,
             s_b: Tensor, grad: Tensor, need: list[bool], div_id: int, scalars: Tensor, ignore_index: int,
             backend: str) -> tuple[Tensor, Tensor]:
    param, temperature = _floats(scalars)
    kw = dict(div_id=div_id, param=param, temperature=temperature, ignore_index=ignore_index)
    grads = divergence.token_div_backward(logits, ref_logits, labels, lse, lse_r, s_a, s_b, grad, need, kw, backend)
    return tuple(_or_empty(g, logits) for g in grads)


@_div_bwd.register_fake
def _(logits, ref_logits, labels, lse, lse_r, s_a, s_b, grad, need, div_id, scalars, ignore_index, backend):
    return (_empty_unless(need[0], lambda: logits.new_empty(logits.shape), logits),
            _empty_unless(need[1], lambda: ref_logits.new_empty(ref_logits.shape), logits))


def _div_setup(ctx, inputs, output):
    logits, ref_logits, labels, *args = inputs
    ctx.save_for_backward(logits, ref_logits, labels, *output[1:])
    ctx.args = args


def _div_backward(ctx, grad, *_):
    logits, ref_logits, labels, *stats = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:2])
    grads = (None, None)
    if any(need):
        grads = _nones(_div_bwd(logits, ref_logits, labels, *stats, grad, need, *ctx.args), need)
    return *grads, *[None] * 5


_div_fwd.register_autograd(_div_backward, setup_context=_div_setup)


def token_divergence(logits, ref_logits, labels, kw, backend):
    """``TokenDivergenceFunction.apply`` under torch.compile."""
    return _div_fwd(logits, ref_logits, labels, kw["div_id"], _scalars(kw["param"], kw["temperature"]),
                    kw["ignore_index"], backend)[0]


# linear_token_divergence

@torch.library.custom_op("fastpref::linear_token_divergence_fwd", mutates_args=())
def _linear_div_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                    ref_bias: Optional[Tensor], labels: Optional[Tensor], div_id: int, scalars: Tensor,
                    ignore_index: int, chunk_size: Optional[int],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if labels is not None:
        check_label_values(labels, weight.shape[0], ignore_index)
    param, temperature = _floats(scalars)
    kw = dict(div_id=div_id, param=param, temperature=temperature, ignore_index=ignore_index)
    return divergence.linear_div_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kw,
                                         chunk_size, backend)[:5]


@_linear_div_fwd.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, div_id, scalars, ignore_index, chunk_size,
      backend):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=_F32) for _ in range(5))


@torch.library.custom_op("fastpref::linear_token_divergence_bwd", mutates_args=())
def _linear_div_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                    ref_bias: Optional[Tensor], labels: Optional[Tensor], lse: Tensor, lse_r: Tensor, s_a: Tensor,
                    s_b: Tensor, grad: Tensor, needs: list[bool], div_id: int, scalars: Tensor, ignore_index: int,
                    chunk_size: Optional[int], backend: str) -> list[Tensor]:
    param, temperature = _floats(scalars)
    kw = dict(div_id=div_id, param=param, temperature=temperature, ignore_index=ignore_index)
    grads = divergence.linear_div_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse,
                                           lse_r, s_a, s_b, grad, needs, kw, chunk_size, backend)
    return [_or_empty(g, like) for g, like in zip(grads, (weight,) * 3 + (ref_weight,) * 3)]


@_linear_div_bwd.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, lse_r, s_a, s_b, grad, needs, div_id,
      scalars, ignore_index, chunk_size, backend):
    return [*_head_fakes(hidden, weight, bias, needs[:3]), *_head_fakes(ref_hidden, ref_weight, ref_bias, needs[3:])]


def _linear_div_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], *output[1:])
    ctx.args = inputs[7:]


def _linear_div_backward(ctx, grad, *_):
    *tensors, lse, lse_r, s_a, s_b = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = (None,) * 6
    if any(needs):
        grads = _nones(_linear_div_bwd(*tensors, lse, lse_r, s_a, s_b, grad, needs, *ctx.args), needs)
    return *grads, *[None] * 6


_linear_div_fwd.register_autograd(_linear_div_backward, setup_context=_linear_div_setup)


def linear_token_divergence(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kw, chunk_size, backend):
    """``LinearTokenDivergenceFunction.apply`` under torch.compile."""
    return _linear_div_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kw["div_id"],
                           _scalars(kw["param"], kw["temperature"]), kw["ignore_index"], chunk_size, backend)[0]


# The fused losses: gradients computed in the forward, carried to the inputs by head_grads.

@torch.library.custom_op("fastpref::head_grads", mutates_args=())
def _head_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], grad_hidden: Tensor, grad_weight: Tensor,
                grad_bias: Tensor) -> Tensor:
    return hidden.new_zeros((), dtype=_F32)


@_head_grads.register_fake
def _(hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    return hidden.new_zeros((), dtype=_F32)


def _head_grads_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[3:])


def _head_grads_backward(ctx, grad):
    grads = tuple(g * grad.to(g.dtype) for g in ctx.saved_tensors)
    return *_nones(grads, ctx.needs_input_grad[:3]), None, None, None


_head_grads.register_autograd(_head_grads_backward, setup_context=_head_grads_setup)


@torch.library.custom_op("fastpref::linear_dpo_pass", mutates_args=())
def _dpo_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ref_logps: Optional[Tensor],
              loss_type: str, divergence: str, reduction: str, ignore_index: int, chunk_size: Optional[int],
              backend: str, param_names: str, scalars: Tensor,
              need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_label_values(labels, weight.shape[0], ignore_index)
    beta, label_smoothing, nll_coef, *param_values = _floats(scalars)
    params = dict(zip(param_names.split(","), param_values)) if param_names else {}
    cfg = dict(beta=beta, loss_type=loss_type, divergence=divergence, label_smoothing=label_smoothing,
               nll_coef=nll_coef, reduction=reduction, ignore_index=ignore_index, chunk_size=chunk_size,
               backend=backend, params=params)
    with _autograd_inside():
        seq_logps, lengths, chosen_tokens, grads = linear_preference.dpo_pass(hidden, weight, bias, labels, ref_logps,
                                                                              cfg, need)
    return seq_logps, lengths, chosen_tokens, *(_or_empty(g, weight) for g in grads)


@_dpo_pass.register_fake
def _(hidden, weight, bias, labels, ref_logps, loss_type, divergence, reduction, ignore_index, chunk_size, backend,
      param_names, scalars, need):
    two_b = labels.shape[0]
    return (hidden.new_empty(two_b, dtype=_F32), labels.new_empty(two_b, dtype=torch.int64),
            labels.new_empty((), dtype=torch.int64),
            _empty_unless(need[0], lambda: hidden.new_empty(hidden.shape), hidden),
            *_head_fakes(hidden, weight, bias, need)[1:])


def linear_dpo(hidden, weight, bias, labels, ref_logps, cfg):
    """``_LinearDPOFunction.apply`` under torch.compile: (loss, chosen_rewards, rejected_rewards, chosen_logps,
    rejected_logps)."""
    need = _needs(cfg, hidden, weight, bias)
    params = cfg["params"]
    seq_logps, lengths, chosen_tokens, *grads = _dpo_pass(
        *_detached(hidden, weight, bias), labels, ref_logps, cfg["loss_type"], cfg["divergence"], cfg["reduction"],
        cfg["ignore_index"], cfg["chunk_size"], cfg["backend"], ",".join(params),
        _scalars(cfg["beta"], cfg["label_smoothing"], cfg["nll_coef"], *params.values()), need)
    loss, *rest = linear_preference._loss(seq_logps, ref_logps, lengths, chosen_tokens, cfg)
    return (loss + _head_grads(hidden, weight, bias, *grads), *rest)


@torch.library.custom_op("fastpref::linear_ppo_pass", mutates_args=())
def _ppo_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, old_logp: Optional[Tensor],
              adv: Tensor, ref_logp: Optional[Tensor], w: Tensor, scalars: Tensor, kl_estimator: str,
              ignore_index: int, chunk_size: Optional[int], with_entropy: bool, backend: str,
              need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_label_values(labels, weight.shape[0], ignore_index)
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, temperature, softcap = _floats(scalars)
    per_token = dict(old_logp=old_logp, adv=adv, ref_logp=ref_logp, w=w)
    cfg = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
               kl_estimator=kl_estimator, entropy_coef=entropy_coef, temperature=temperature, softcap=softcap,
               ignore_index=ignore_index, chunk_size=chunk_size, with_entropy=with_entropy, backend=backend)
    with _autograd_inside():
        logp, entropy, grads = linear_policy.ppo_pass(hidden, weight, bias, labels, per_token, cfg, need)
    return logp, _or_empty(entropy, logp), *(_or_empty(g, weight) for g in grads)


@_ppo_pass.register_fake
def _(hidden, weight, bias, labels, old_logp, adv, ref_logp, w, scalars, kl_estimator, ignore_index, chunk_size,
      with_entropy, backend, need):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=_F32), hidden.new_empty(n if with_entropy else 0, dtype=_F32),
            *_head_fakes(hidden, weight, bias, need))


def linear_ppo(hidden, weight, bias, labels, per_token, cfg):
    """``_LinearPPOFunction.apply`` under torch.compile: (loss, logp [N], entropy [N] or None), the metrics in
    ``cfg["metrics"]``."""
    need = _needs(cfg, hidden, weight, bias)
    logp, entropy, *grads = _ppo_pass(
        *_detached(hidden, weight, bias), labels, per_token["old_logp"], per_token["adv"], per_token["ref_logp"],
        per_token["w"], _scalars(*(cfg[k] for k in ("clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef",
                                                    "temperature", "softcap"))),
        cfg["kl_estimator"], cfg["ignore_index"], cfg["chunk_size"], cfg["with_entropy"], cfg["backend"], need)
    entropy = entropy if cfg["with_entropy"] else None
    loss = linear_policy.policy_loss(logp, entropy, cfg)
    return loss + _head_grads(hidden, weight, bias, *grads), logp, entropy
