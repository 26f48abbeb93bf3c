"""Preference losses over sequence log-probs: the DPO family (with f-divergence scores), SimPO, ORPO, and
Bradley-Terry for reward models, on [B] vectors.

The formulas are written once, as torch ops (``_per_pair``, ``_reference_free``, ``_bt_per_pair``); the
torch path (backends torch and cpu, and every loss type) differentiates them with autograd. On the triton
backend the types of ``PAIRWISE_TYPES`` (all but aot, aot_unpaired and orpo, which couple the pairs of a
batch) run as one launch of the pairwise kernel (``kernels/triton/pairwise.py``, derivatives by hand),
which writes each pair's loss and both its derivatives, so the backward only scales saved vectors. Its
torch twin, ``kernels/reference.py``'s ``pair_forward``, is autograd over the same formulas.

The fused-linear form that also produces the sequence log-probs from hidden states is ``linear_dpo_loss``
(``ops/linear_preference.py``).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastpref import _backends, divergences
from fastpref._validate import check_positive
from fastpref.ops import compiling, resolve


class PreferenceOutput(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict


# Types whose loss is a function of the divergence scores s = g(rho) (f-DPO applies to them).
SCORE_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm")
# Types defined on the log-ratios rho themselves (reverse-KL only, as in TRL).
RATIO_TYPES = ("nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down")
REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = SCORE_TYPES + RATIO_TYPES + REFERENCE_FREE
LENGTH_NORMALIZED = ("ipo", "sigmoid_norm", "simpo", "orpo")
_PARAMS = {"simpo": {"gamma": 0.5}, "discopop": {"tau": 0.05}}
# Types whose per-pair loss depends on that pair alone: the pairwise kernel covers them (its loss ids are
# indices here; "bt" is bt_loss). aot/aot_unpaired sort the batch and orpo's NLL is a batch mean.
PAIRWISE_TYPES = SCORE_TYPES + ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "simpo", "bt")


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and for large |x|. Each form sees only arguments of its own
    range: where a form is not taken its value is discarded, but its gradient still multiplies 0, and
    log1p(-exp(x)) at x within 6e-8 of 0 (exp(x) = 1 in fp32) has an infinite one (0 * inf = NaN)."""
    near = x > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def _check_vector(name, t, like=None):
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(t.shape)}")
    if like is not None and (t.shape != like.shape or t.device != like.device):
        raise ValueError(f"{name} must match chosen_logps ({tuple(like.shape)} on {like.device}), "
                         f"got {tuple(t.shape)} on {t.device}")


def _reduce(per_pair, reduction):
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


class _PairwiseLoss(torch.autograd.Function):
    """A kernel-covered pairwise loss: the forward is one launch of ``kernel`` (``pair_forward``'s
    contract), which also writes each pair's d loss/d chosen and d loss/d rejected; the backward scales
    those saved vectors by the upstream gradient (1/B more for the mean). Not twice differentiable."""

    @staticmethod
    def forward(ctx, chosen, rejected, reduction, kernel):
        per_pair, grad_chosen, grad_rejected = kernel(chosen, rejected)
        ctx.save_for_backward(grad_chosen, grad_rejected)
        ctx.reduction = reduction
        ctx.dtypes = chosen.dtype, rejected.dtype
        return _reduce(per_pair, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_chosen, grad_rejected = ctx.saved_tensors
        if ctx.reduction == "mean":
            grad = grad / max(grad_chosen.shape[0], 1)
        grads = [(grad * g).to(dtype) if needed else None
                 for g, dtype, needed in zip((grad_chosen, grad_rejected), ctx.dtypes, ctx.needs_input_grad)]
        return (*grads, None, None)


def _kernel_path(backend):
    """Whether the pairwise kernel runs: on triton, and not under torch.compile, which fuses the torch formulas
    itself (and cannot trace the kernel's autograd Function)."""
    return backend == "triton" and not compiling()


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta=0.1,
             loss_type="sigmoid", divergence="reverse_kl", label_smoothing=0.0, reduction="mean",
             chosen_lengths=None, rejected_lengths=None, backend="auto", **params):
    """DPO-family loss from sequence log-probs [B] (summed over completion tokens).

    Loss types (TRL 1.x DPOTrainer formulas unless noted; s = g(rho) the divergence score of
    rho = logp - ref_logp, D = s_w - s_l, eps = label_smoothing):
    sigmoid ``-(1-eps) log sig(beta D) - eps log sig(-beta D)`` (conservative DPO; TRL dropped eps here,
    DESIGN.md keeps it), hinge, ipo (scores divided by the completion lengths, as TRL does), robust,
    exo_pair (needs eps > 0), discopop (``tau``, default 0.05), sigmoid_norm (length-normalized sigmoid),
    and on the log-ratios: nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down.
    Reference-free: simpo ``-log sig(beta (avg_w - avg_l) - gamma)`` (``gamma``, default 0.5, with eps
    smoothing as TRL's CPO) and orpo ``NLL(y_w) - beta log sig(log odds_w - log odds_l)`` (beta is ORPO's
    lambda; NLL is the token mean over the batch's chosen completions).

    ``divergence`` (reverse_kl, forward_kl, js, alpha; param ``alpha`` or ``js_beta``) picks the f-DPO score
    g from ``fastpref.divergences`` for the score types; constants of f' are dropped (DESIGN.md), which only
    matters for the length-normalized ipo and sigmoid_norm, where TRL keeps them.

    ``chosen_lengths`` / ``rejected_lengths`` (completion token counts [B]) are required by ipo,
    sigmoid_norm, simpo and orpo. Rewards are ``beta * rho`` (``beta * avg logp`` for simpo/orpo),
    detached. Metrics use TRL's names.

    ``backend`` ("auto", "triton", "cuda", "cpu", "torch"): on "triton" (what "auto" picks for CUDA
    tensors when Triton is installed) the types in ``PAIRWISE_TYPES`` (all but aot, aot_unpaired and orpo)
    run as one kernel launch that computes each pair's loss with its gradients, and the backward only
    scales them (not twice differentiable). Everything else takes the torch path, autograd through torch
    ops: the other backends, aot, aot_unpaired and orpo, reference log-probs that require grad (the
    kernel differentiates in the policy's log-probs only), and calls under torch.compile (Inductor fuses the
    formulas itself). Losses, rewards and metrics agree either way.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if loss_type == "exo_pair" and label_smoothing == 0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_vector("chosen_logps", chosen_logps)
    _check_vector("rejected_logps", rejected_logps, chosen_logps)
    name = resolve(backend, chosen_logps.device, "pairwise")
    own = dict(_PARAMS.get(loss_type, {}))
    for k in list(params):
        if k in own:
            own[k] = params.pop(k)
    div, div_param = divergences.get(divergence, params)
    if divergence != "reverse_kl" and loss_type not in SCORE_TYPES:
        raise ValueError(f"divergence={divergence!r} applies to the score-based loss types {SCORE_TYPES}, "
                         f"not to {loss_type!r}")
    if div.score is None:
        raise ValueError(f"divergence {divergence!r} has no DPO score; use one of "
                         f"{[n for n, d in divergences.REGISTRY.items() if d.score is not None]}")
    lw = ll = None
    if loss_type in LENGTH_NORMALIZED:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} is length-normalized: pass chosen_lengths and rejected_lengths")
        lw = torch.as_tensor(chosen_lengths, device=chosen_logps.device).float().clamp(min=1)
        ll = torch.as_tensor(rejected_lengths, device=chosen_logps.device).float().clamp(min=1)
        _check_vector("chosen_lengths", lw, chosen_logps)
        _check_vector("rejected_lengths", ll, chosen_logps)
    ref_free = loss_type in REFERENCE_FREE
    if ref_free:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError(f"loss_type={loss_type!r} is reference-free: do not pass reference log-probs")
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        _check_vector("ref_chosen_logps", ref_chosen_logps, chosen_logps)
        _check_vector("ref_rejected_logps", ref_rejected_logps, chosen_logps)
    fused = _kernel_path(name) and loss_type in PAIRWISE_TYPES and not _needs_grad(ref_chosen_logps,
                                                                                   ref_rejected_logps)
    eps = label_smoothing
    # The kernel path takes the gradients from its kernel: the rewards below need no graph.
    cw, cl = (chosen_logps.detach().float(), rejected_logps.detach().float()) if fused else \
        (chosen_logps.float(), rejected_logps.float())
    if ref_free:
        xw, xl = cw / lw, cl / ll
    else:
        xw, xl = cw - ref_chosen_logps.float(), cl - ref_rejected_logps.float()
    if fused:
        kernel = functools.partial(
            _backends.row_kernels(name, "pairwise").pair_forward, ref_chosen=ref_chosen_logps,
            ref_rejected=ref_rejected_logps, chosen_lengths=lw, rejected_lengths=ll, loss_type=loss_type, beta=beta,
            label_smoothing=eps, div_id=div.kernel_id, param=div_param, **own)
        loss = _PairwiseLoss.apply(chosen_logps, rejected_logps, reduction, kernel)
    else:
        if ref_free:
            per_pair = _reference_free(loss_type, cw, cl, lw, ll, beta, eps, own)
        else:
            per_pair = _per_pair(loss_type, xw, xl, cw - cl, ref_chosen_logps.float() - ref_rejected_logps.float(),
                                 lambda r: div.score(r, div_param), beta, eps, own, lw, ll)
        loss = _reduce(per_pair, reduction)
    rw, rl = beta * xw.detach(), beta * xl.detach()
    metrics = {
        "rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
        "rewards/accuracies": (rw > rl).float().mean(), "rewards/margins": (rw - rl).mean(),
        "logps/chosen": chosen_logps.detach().float().mean(), "logps/rejected": rejected_logps.detach().float().mean(),
    }
    return PreferenceOutput(loss, rw, rl, metrics)


def _reference_free(loss_type, cw, cl, lw, ll, beta, eps, own):
    """Per-pair simpo or orpo loss from the summed log-probs and the completion lengths."""
    aw, al = cw / lw, cl / ll
    if loss_type == "simpo":
        z = beta * (aw - al) - own["gamma"]
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    log_odds = (aw - al) - (_log1mexp(aw) - _log1mexp(al))
    nll = -cw.sum() / lw.sum()
    return nll - beta * F.logsigmoid(log_odds)


def _per_pair(loss_type, rho_w, rho_l, logratios, ref_logratios, score, beta, eps, own, lw, ll):
    if loss_type in SCORE_TYPES:
        s_w, s_l = score(rho_w), score(rho_l)
        z = beta * (s_w - s_l)
        if loss_type == "sigmoid":
            return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        if loss_type == "hinge":
            return torch.relu(1 - z)
        if loss_type == "ipo":
            return (s_w / lw - s_l / ll - 1 / (2 * beta)) ** 2
        if loss_type == "robust":
            return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        if loss_type == "exo_pair":
            return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                    + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
        if loss_type == "discopop":
            # exp(-z) sig(z / tau) as one exp: finite where exp(-z) alone overflows (z < -88 in fp32).
            return -F.logsigmoid(z) * torch.sigmoid(-z / own["tau"]) + torch.exp(F.logsigmoid(z / own["tau"]) - z)
        return -F.logsigmoid(beta * (s_w / lw - s_l / ll))  # sigmoid_norm
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * rho_w) - 0.5 * F.logsigmoid(-beta * rho_w) - 0.5 * F.logsigmoid(-beta * rho_l)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * rho_w) - F.logsigmoid(-beta * rho_l)
    if loss_type == "sppo_hard":
        return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        a, b = (logratios, ref_logratios) if loss_type == "aot" else (rho_w, rho_l)
        d = beta * (torch.sort(a).values - torch.sort(b).values)
        return -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * rho_w) + torch.sigmoid(beta * rho_l)
    return torch.sigmoid(beta * rho_w) + 1 - torch.sigmoid(beta * (rho_w - rho_l))  # apo_down


def _bt_per_pair(rw, rl, margin, center_coef):
    """Per-pair Bradley-Terry loss of the rewards; ``margin`` None, a number or a tensor ([] or [B])."""
    diff = rw - rl
    if margin is not None:
        diff = diff - margin
    per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (rw + rl) ** 2
    return per_pair


def bt_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0, reduction="mean", backend="auto"):
    """Bradley-Terry reward-model loss (TRL RewardTrainer): per pair ``-log sig(r_w - r_l - margin)
    + center_coef * (r_w + r_l)^2`` (reward centering), so that the mean is TRL's loss.

    ``margin``: None, a number, or a tensor (scalar or [B]). ``backend`` as in ``dpo_loss``: on "triton" one
    kernel launch computes the per-pair losses and their gradients (a margin that requires grad takes the
    torch path). Returns a PreferenceOutput whose rewards are the inputs (detached) and whose metrics are
    TRL's ``accuracy`` and ``margin``.
    """
    _check_vector("chosen_rewards", chosen_rewards)
    _check_vector("rejected_rewards", rejected_rewards, chosen_rewards)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_positive("center_coef", center_coef, allow_zero=True)
    name = resolve(backend, chosen_rewards.device, "pairwise")
    # A Python number stays a number (the kernel's scalar; no host-to-device copy), anything else a tensor.
    if margin is not None and not isinstance(margin, (int, float)):
        margin = torch.as_tensor(margin, device=chosen_rewards.device, dtype=torch.float32)
        if margin.dim() > 0 and margin.shape != chosen_rewards.shape:
            raise ValueError(f"margin must be a scalar or of shape {tuple(chosen_rewards.shape)}, "
                             f"got {tuple(margin.shape)}")
    if _kernel_path(name) and not _needs_grad(margin):
        kernel = functools.partial(_backends.row_kernels(name, "pairwise").pair_forward, loss_type="bt",
                                   margin=margin, center_coef=center_coef)
        loss = _PairwiseLoss.apply(chosen_rewards, rejected_rewards, reduction, kernel)
    else:
        loss = _reduce(_bt_per_pair(chosen_rewards.float(), rejected_rewards.float(), margin, center_coef), reduction)
    rw, rl = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    metrics = {"accuracy": (rw > rl).float().mean(), "margin": (rw - rl).mean()}
    return PreferenceOutput(loss, chosen_rewards.detach(), rejected_rewards.detach(), metrics)
