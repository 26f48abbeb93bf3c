"""linear_ppo_loss: per-token log-probs and entropy from hidden states and the head, and the PPO/GRPO loss,
in one call that never holds [N, V] logits.

The policy loss is ``sum_t w_t l_t(logp_t, H_t)`` (``fastpref.ops.policy``): each token's loss gradient is
known as soon as its log-prob and entropy are. So the forward computes, chunk by chunk, the logits, the
row statistics, the per-token loss gradient and at once the head gradients from the logits still in the
buffer: 3 matmuls per token, not the 4 of a recomputing backward. The backward only scales them.
"""
from __future__ import annotations

import torch

from fastpref import _backends
from fastpref._validate import check_chunk_size, check_float, check_labels, check_positive, check_same_device
from fastpref.ops import compiling, resolve
from fastpref.ops._sharded import gathered
from fastpref.ops.divergence import linear_token_divergence
from fastpref.ops.logprobs import (HeadGrads, _chunk_logits, _kept_rows, chunk_buffers, head_chunk_size,
                                   linear_logprobs, row_buffer, scale_head_grads)
from fastpref.ops.policy import (PolicyOutput, aggregation_weights, check_policy_args, masked_fp32, ppo_loss,
                                 token_loss)


def ppo_pass(hidden, weight, bias, labels, per_token, cfg, need):
    """The chunk loop of ``linear_ppo_loss`` (its autograd Function's and its compiled op's): (logp [N], entropy [N]
    or None, (grad hidden, grad weight, grad bias)), the gradients those of sum_t w_t l_t, None where ``need`` (3
    bools) is False. hidden [N, H], labels [N] (masked tokens already ``ignore_index``), per_token: dict of [N]
    fp32 tensors (old_logp or None, adv, ref_logp or None, w)."""
    ops = _backends.row_kernels(cfg["backend"], "logprobs")
    kw = dict(temperature=cfg["temperature"], softcap=cfg["softcap"], ignore_index=cfg["ignore_index"])
    N, V = hidden.shape[0], weight.shape[0]
    rows = _kept_rows(labels, cfg["ignore_index"])
    y = labels if rows is None else labels.index_select(0, rows)
    n = y.shape[0]
    with_entropy = cfg["with_entropy"]
    logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros_like(logp) if with_entropy else None
    chunk = min(cfg["chunk_size"] or head_chunk_size(n, V, hidden, need[1]), max(n, 1))
    buf, gbuf = chunk_buffers(chunk, V, hidden)
    grads = HeadGrads(hidden, weight, bias, need, rows=rows, single=0 < n <= chunk)
    hbuf = row_buffer(rows, chunk, hidden)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc = grads.gather(s, e, hbuf)
        z = _chunk_logits(hc, weight, bias, buf[: e - s])
        lp, ls, en = ops.row_forward(z, y[s:e], with_entropy=with_entropy, **kw)
        idx = slice(s, e) if rows is None else rows[s:e]
        logp[idx] = lp
        if with_entropy:
            entropy[idx] = en
        if any(need):
            glp, gen = _token_grads(lp, en, {k: None if v is None else v[idx] for k, v in per_token.items()}, cfg)
            g = gbuf[: e - s]
            ops.row_backward(z, y[s:e], ls, en if gen is not None else None, glp, gen, g, **kw)
            grads.add(g, s, e, hc)
    # The chunk buffers go before ``result`` turns an fp32 weight-gradient accumulator into the head's dtype:
    # the peak is then the accumulator and one of them, not all three.
    buf = gbuf = hbuf = hc = z = g = None
    return logp, entropy, grads.result(hidden, rows)


class _LinearPPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, per_token, cfg):
        """Returns (loss, logp [N], entropy [N] or None); the loss's metrics go to ``cfg["metrics"]``."""
        # Inside forward grad mode is off; the caller's mode (eval: no gradient work) comes in cfg.
        need = [ctx.needs_input_grad[i] and cfg["grad"] for i in range(3)]
        logp, entropy, grads = ppo_pass(hidden, weight, bias, labels, per_token, cfg, need)
        loss = policy_loss(logp, entropy, cfg)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(logp, *([entropy] if entropy is not None else []))
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return (*scale_head_grads(grad_loss, ctx.saved_tensors), None, None, None)


def policy_loss(logp, entropy, cfg):
    """``ppo_loss`` of the pass's per-token results (its value; the metrics go to ``cfg["metrics"]``)."""
    args = cfg["loss_args"]
    shape = args["mask"].shape
    out = ppo_loss(logp.view(shape), entropy=None if entropy is None else entropy.view(shape), **args)
    cfg["metrics"] = out.metrics
    return out.loss


def _token_grads(lp, en, t, cfg):
    """d (sum_t w_t l_t) / d logp_t and / d H_t for one chunk's kept tokens (fp32)."""
    lp = lp.detach().requires_grad_()
    ent = en.detach().requires_grad_() if cfg["entropy_coef"] and en is not None else None
    with torch.enable_grad():
        old = lp.detach() if t["old_logp"] is None else t["old_logp"]
        loss, _ = token_loss(lp, old, t["adv"], cfg, ref_logp=t["ref_logp"], entropy=ent)
        inputs = (lp,) if ent is None else (lp, ent)
        grads = torch.autograd.grad((t["w"] * loss).sum(), inputs)
    return grads[0], grads[1] if ent is not None else None


def linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask=None, *, bias=None, ignore_index=-100,
                    temperature=1.0, softcap=None, clip_low=0.2, clip_high=None, dual_clip=None, importance="token",
                    ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, divergence=None, kl_coef=0.0,
                    kl_estimator="k3", entropy_coef=0.0, compute_entropy=True, loss_agg="token-mean",
                    num_items=None, chunk_size=None, backend="auto", **params):
    """``ppo_loss`` straight from hidden states: hidden [B, T, H], the head weight [V, H] (+ bias), labels
    [B, T] the sampled tokens (already shifted), ``old_logp`` [B, T] (None: on-policy), ``advantages`` [B]
    or [B, T], ``mask`` [B, T] (None: ``labels != ignore_index``; tokens that are masked or ignored both
    drop out before any matmul).

    Log-probs and entropy are those of ``softcap(hidden @ weight.T + bias) / temperature`` (pass the rollout
    temperature). The KL penalty comes from one of:

    - ``ref_logp`` [B, T]: a sampled estimate (``kl_estimator``: k1, k2, k3, low_var_kl, "+" variants);
    - ``ref_hidden`` + ``ref_weight`` (+ ``ref_bias``), no ``divergence``: the same sampled estimate with the
      reference log-probs computed chunkwise without gradient;
    - ``ref_hidden`` + ``ref_weight`` and ``divergence`` (reverse_kl, forward_kl, js, alpha, tv, hellinger;
      params ``js_beta``/``alpha``): the full-vocabulary D_f(pi || pi_ref) per token
      (``linear_token_divergence``: both heads on bounded chunks, its own forward and backward).

    Token-level ratios take the one-pass path (3 matmuls per kept token, gradients computed in the
    forward; a bf16/fp16 head's weight gradient is summed over the chunks in an fp32 [V, H] buffer, or
    written directly when one chunk holds every token, which ``head_chunk_size`` chooses whenever it costs
    less memory than the buffer); ``importance="sequence"`` (GSPO) couples a sequence's tokens, so it runs
    ``linear_logprobs`` then ``ppo_loss`` (4 matmuls). ``compute_entropy`` (default True, for the
    ``entropy`` metric as TRL logs it) is forced on by ``entropy_coef`` > 0. Returns
    ``PolicyOutput(loss, metrics)``: ``ppo_loss``'s metrics plus ``logp`` [B, T] (detached, fp32: the
    ``old_logp`` of the next PPO epoch). Without grad (eval) no gradient work is done. The heads may be
    sharded parameters (FSDP2 DTensor, DeepSpeed ZeRO-3), gathered for the call as in ``linear_logprobs``.
    """
    # The reference head is gathered by the op that uses it (linear_logprobs without grad, or
    # linear_token_divergence).
    weight, bias = gathered("weight", weight), gathered("bias", bias)
    check_float("hidden", hidden, dim=3)
    check_float("weight", weight, dim=2)
    if weight.shape[1] != hidden.shape[2] or weight.dtype != hidden.dtype:
        raise ValueError(f"weight must be [V, {hidden.shape[2]}] of dtype {hidden.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    V = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (V,) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [{V}] of dtype {hidden.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    check_labels(labels, hidden.shape[:2], V, ignore_index)
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, allow_none=True)
    check_chunk_size(chunk_size)
    shape = labels.shape
    if mask is None:
        mask = labels != ignore_index
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must be a tensor of shape {tuple(shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.bool() & (labels != ignore_index)
    has_model = ref_hidden is not None or ref_weight is not None
    if has_model and (ref_hidden is None or ref_weight is None):
        raise ValueError("pass both ref_hidden and ref_weight")
    if has_model and ref_logp is not None:
        raise ValueError("pass either ref_logp or ref_hidden/ref_weight, not both")
    if divergence is not None and not has_model:
        raise ValueError("divergence= (full-vocabulary penalty) needs ref_hidden and ref_weight")
    if divergence is not None and softcap is not None:
        raise ValueError("the full-vocabulary divergence penalty does not support softcap")
    with_entropy = bool(compute_entropy or entropy_coef)
    probe = torch.zeros(shape, device=hidden.device)
    mask, adv = check_policy_args(
        shape, hidden.device, old_logp=old_logp, advantages=advantages, mask=mask,
        ref_logp=ref_logp if ref_logp is not None else (probe if has_model and divergence is None else None),
        kl=probe if divergence is not None else None, entropy=probe if with_entropy else None,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, loss_agg=loss_agg, num_items=num_items, importance=importance)
    name = resolve(backend, hidden.device, "logprobs")
    y = labels.masked_fill(~mask, ignore_index)
    head = dict(bias=bias, ignore_index=ignore_index, temperature=temperature, chunk_size=chunk_size, backend=name)

    kl = None
    if has_model and divergence is None:
        with torch.no_grad():
            ref_logp = linear_logprobs(ref_hidden, ref_weight, y, bias=ref_bias, ignore_index=ignore_index,
                                       temperature=temperature, softcap=softcap, chunk_size=chunk_size, backend=name)
    elif divergence is not None:
        kl = linear_token_divergence(hidden, weight, ref_hidden, ref_weight, divergence=divergence, bias=bias,
                                     ref_bias=ref_bias, labels=y, ignore_index=ignore_index, temperature=temperature,
                                     chunk_size=chunk_size, backend=name, **params)
    elif params:
        raise TypeError(f"unexpected keyword argument(s) {sorted(params)} (divergence parameters need divergence=)")
    policy = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, importance=importance,
                  kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg,
                  num_items=num_items)

    if importance == "sequence":
        out = linear_logprobs(hidden, weight, y, softcap=softcap, return_entropy=with_entropy, **head)
        logp, entropy = out if with_entropy else (out, None)
        res = ppo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, kl=kl, entropy=entropy, **policy)
        res.metrics["logp"] = logp.detach()
        return res

    w = aggregation_weights(mask, loss_agg, num_items)
    flat = (lambda t: None if t is None else masked_fp32(t, mask).reshape(-1))
    per_token = dict(old_logp=flat(old_logp), adv=flat(adv), ref_logp=flat(ref_logp), w=w.reshape(-1))
    # The loss value and metrics come from ppo_loss itself on the computed log-probs; a full-vocabulary
    # penalty joins them (for its metric) detached and with no coefficient, and is added below with its own
    # autograd graph.
    loss_args = dict(old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                     kl=None if kl is None else kl.detach(), **dict(policy, kl_coef=0.0 if kl is not None else kl_coef))
    cfg = dict(policy, backend=name, temperature=float(temperature), softcap=float(softcap or 0.0),
               ignore_index=int(ignore_index), chunk_size=chunk_size, with_entropy=with_entropy,
               grad=torch.is_grad_enabled(), loss_args=loss_args)
    args = (hidden.reshape(-1, hidden.shape[2]), weight, bias, y.reshape(-1), per_token, cfg)
    if compiling():
        from fastpref.ops import _library

        loss, logp, _ = _library.linear_ppo(*args)
    else:
        loss, logp, _ = _LinearPPOFunction.apply(*args)
    if kl is not None and kl_coef:
        loss = loss + kl_coef * (w * torch.where(mask, kl, 0.0)).sum()
    metrics = cfg["metrics"]
    metrics["logp"] = logp.view(shape)
    return PolicyOutput(loss, metrics)
