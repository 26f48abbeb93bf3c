"""PPO/GRPO policy losses and the PPO value loss over per-token tensors [B, T].

Every policy loss here is ``sum_t w_t l_t``: a per-token loss ``l_t`` (clipped surrogate, KL penalty,
entropy bonus) that depends on its own token only, times an aggregation weight ``w_t`` that depends on the
mask alone. ``linear_ppo_loss`` relies on that split: it knows each token's loss gradient as soon as the
token's log-prob is known, and computes the head gradients from the logits still in its chunk buffer.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastpref.ops.kl import ESTIMATORS, kl_estimate

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE = ("token", "sequence")


class PolicyOutput(NamedTuple):
    loss: torch.Tensor
    metrics: dict


def _check_number(name, value, *, low=0.0, allow_none=False, strict=True):
    if value is None and allow_none:
        return
    # Not math.isfinite: see _validate.check_positive.
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < math.inf
    if not ok or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def _check_tensor(name, t, shape, device, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logp is on {device}")


def check_policy_args(shape, device, *, old_logp, advantages, mask, ref_logp, kl, entropy, clip_low, clip_high,
                      dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg, num_items, importance):
    """Validates ``ppo_loss``'s arguments for per-token tensors of ``shape`` [B, T]; returns the mask (bool)
    and the advantages as [B, T]."""
    if len(shape) != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have the shape of logp {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but logp is on {device}")
    if old_logp is not None:
        _check_tensor("old_logp", old_logp, shape, device)
    if not isinstance(advantages, torch.Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating-point torch.Tensor, got "
                        f"{getattr(advantages, 'dtype', type(advantages).__name__)}")
    if tuple(advantages.shape) not in ((shape[0],), tuple(shape)):
        raise ValueError(f"advantages must be [B] = ({shape[0]},) or [B, T] = {tuple(shape)}, got "
                         f"{tuple(advantages.shape)}")
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device} but logp is on {device}")
    for name, t in (("ref_logp", ref_logp), ("kl", kl), ("entropy", entropy)):
        if t is not None:
            _check_tensor(name, t, shape, device)
    if ref_logp is not None and kl is not None:
        raise ValueError("pass either ref_logp (sampled KL estimate) or kl (a precomputed per-token penalty), not both")
    _check_number("clip_low", clip_low)
    _check_number("clip_high", clip_high, allow_none=True)
    _check_number("dual_clip", dual_clip, low=1.0, allow_none=True)
    _check_number("kl_coef", kl_coef, strict=False)
    _check_number("entropy_coef", entropy_coef, strict=False)
    _check_number("num_items", num_items, allow_none=True)
    if kl_estimator not in ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGGS)}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; valid: {', '.join(IMPORTANCE)}")
    if kl_coef and ref_logp is None and kl is None:
        raise ValueError("kl_coef > 0 needs ref_logp (sampled estimate) or kl (precomputed per-token penalty)")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef > 0 needs the per-token entropy")
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1).expand(shape)
    return mask.bool(), adv


def aggregation_weights(mask, loss_agg, num_items=None):
    """w [B, T] such that the aggregated loss is ``sum(w * l)``; 0 at masked tokens.

    token-mean: 1 / (tokens, or ``num_items``); seq-mean-token-mean (GRPO): 1 / (seq length x sequences);
    seq-mean-token-sum: 1 / sequences; seq-mean-token-sum-norm (Dr. GRPO): 1 / (sequences x T). "Sequences"
    is B, or ``num_items`` when given: all-masked rows count, as in TRL's ``.mean()`` over the batch, and
    contribute 0.
    """
    m = mask.float()
    B, T = m.shape
    if loss_agg == "token-mean":
        return m / (num_items if num_items is not None else m.sum().clamp(min=1))
    seqs = num_items if num_items is not None else B
    if loss_agg == "seq-mean-token-mean":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * seqs)
    if loss_agg == "seq-mean-token-sum":
        return m / seqs
    return m / (seqs * T)


def sequence_log_ratio(logp, old_logp, mask):
    """GSPO's per-sequence mean log importance ratio over the unmasked tokens, [B, 1] (detached)."""
    m = mask.float()
    d = torch.where(mask, logp.detach().float() - old_logp.float(), 0.0)
    return (d.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1))


def token_loss(logp, old_logp, adv, cfg, *, ref_logp=None, kl=None, entropy=None, seq_log_ratio=None):
    """Per-token loss l_t (before aggregation) and the pieces the metrics need.

    All inputs are fp32 and finite (masked positions already zeroed). ``seq_log_ratio`` [B, 1] switches the
    ratio to GSPO's sequence-level one: exp(seq_log_ratio) in value, d logp_t in gradient.
    """
    if seq_log_ratio is not None:
        log_ratio = (logp - logp.detach() + seq_log_ratio).clamp(max=10.0)
    else:
        log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clip_high = cfg["clip_high"] if cfg["clip_high"] is not None else cfg["clip_low"]
    clipped = ratio.clamp(1 - cfg["clip_low"], 1 + clip_high)
    loss = torch.maximum(-adv * ratio, -adv * clipped)
    pieces = {"ratio": ratio.detach(), "low": (ratio < 1 - cfg["clip_low"]) & (adv < 0),
              "high": (ratio > 1 + clip_high) & (adv > 0)}
    if cfg["dual_clip"] is not None:
        bound = -adv * cfg["dual_clip"]
        pieces["dual"] = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, estimator=cfg["kl_estimator"])
    if kl is not None:
        pieces["kl"] = kl.detach()
        if cfg["kl_coef"]:
            loss = loss + cfg["kl_coef"] * kl
    if entropy is not None:
        pieces["entropy"] = entropy.detach()
        if cfg["entropy_coef"]:
            loss = loss - cfg["entropy_coef"] * entropy
    return loss, pieces


def masked_fp32(t, mask):
    """fp32 copy with masked positions zeroed, so padding garbage (inf, NaN) never reaches a product."""
    return None if t is None else torch.where(mask, t.float(), 0.0)


def policy_metrics(pieces, mask):
    """Token means over the unmasked tokens (TRL's names), detached scalars."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    mean = (lambda t: (t.float() * m).sum() / n)
    out = {"clip_ratio/low": mean(pieces["low"]), "clip_ratio/high": mean(pieces["high"]),
           "clip_ratio/region": mean(pieces["low"] | pieces["high"]), "ratio/mean": mean(pieces["ratio"])}
    # Masked reductions, not ratio[mask] (a data-dependent shape). Under torch.compile the keys are always there
    # (testing for an unmasked token would break the graph): inf and -inf when every token is masked.
    if torch.compiler.is_compiling() or bool(mask.any()):
        r = pieces["ratio"]
        out.update({"ratio/min": torch.where(mask, r, math.inf).amin(),
                    "ratio/max": torch.where(mask, r, -math.inf).amax()})
    if "dual" in pieces:
        out["clip_ratio/dual"] = mean(pieces["dual"])
    for key in ("kl", "entropy"):
        if key in pieces:
            out[key] = mean(pieces[key])
    return out


def ppo_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
             importance="token", ref_logp=None, kl=None, kl_coef=0.0, kl_estimator="k3", entropy=None,
             entropy_coef=0.0, loss_agg="token-mean", num_items=None):
    """PPO / GRPO policy loss from per-token log-probs [B, T].

    Per token, with ratio c = exp(logp - old_logp) and advantage A (shape [B] or [B, T]):
    ``l = max(-A c, -A clip(c, 1 - clip_low, 1 + clip_high))`` (``clip_high`` defaults to ``clip_low``;
    a larger one is DAPO's clip-higher); ``dual_clip`` d > 1 bounds the loss of negative advantages by
    ``-d A`` (verl's clip_ratio_c); then ``+ kl_coef * k`` and ``- entropy_coef * H``.

    - ``old_logp=None``: on-policy (old = logp detached: ratio 1, gradient of logp), TRL with one iteration.
    - ``importance="sequence"``: GSPO's sequence-level ratio, the exp of the mean log-ratio over the
      sequence's tokens, with verl's GSPO-token gradient (ratio detached times d logp_t); use small clips
      (GSPO uses 3e-4 / 4e-4) and ``loss_agg="seq-mean-token-mean"``.
    - KL: ``ref_logp`` [B, T] gives the sampled estimate ``kl_estimate(logp, ref_logp, kl_estimator)``
      (k1, k2, k3, low_var_kl, and the straight-through "+" variants); or pass ``kl`` [B, T], any per-token
      penalty computed elsewhere (a full-vocabulary ``token_divergence``, ``generator_penalty``) and
      differentiable: it is multiplied by ``kl_coef`` and aggregated like the rest.
    - ``entropy`` [B, T] (e.g. from ``token_logprobs(..., return_entropy=True)``): logged, and a bonus when
      ``entropy_coef`` > 0.
    - ``loss_agg``: token-mean (``num_items`` = the global token count under gradient accumulation),
      seq-mean-token-mean (GRPO), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO, / (B * T)); for the
      seq-* modes ``num_items`` is the global sequence count. See ``aggregation_weights``.

    Masked tokens (``mask`` False/0) contribute nothing and their values may be anything (NaN included).
    The log-ratio is clamped to [-20, 20] before the exp. Returns ``PolicyOutput(loss, metrics)`` with
    metrics ``clip_ratio/low``, ``clip_ratio/high``, ``clip_ratio/region`` (TRL's definitions: the ratio is
    past the bound on the side that clips for the advantage's sign), ``clip_ratio/dual``, ``ratio/mean``,
    ``ratio/min``, ``ratio/max``, ``kl``, ``entropy`` (token means; the last two when given). ``ratio/min``
    and ``ratio/max`` are left out when every token is masked, except under torch.compile (inf and -inf then).
    """
    if not isinstance(logp, torch.Tensor) or not logp.dtype.is_floating_point:
        raise TypeError(f"logp must be a floating-point torch.Tensor, got "
                        f"{getattr(logp, 'dtype', type(logp).__name__)}")
    mask, adv = check_policy_args(
        logp.shape, logp.device, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, kl=kl,
        entropy=entropy, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg, num_items=num_items,
        importance=importance)
    cfg = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
               kl_estimator=kl_estimator, entropy_coef=entropy_coef)
    lp = masked_fp32(logp, mask)
    old = lp.detach() if old_logp is None else masked_fp32(old_logp, mask)
    seq = sequence_log_ratio(lp, old, mask) if importance == "sequence" else None
    per_token, pieces = token_loss(lp, old, masked_fp32(adv, mask), cfg, ref_logp=masked_fp32(ref_logp, mask),
                                   kl=masked_fp32(kl, mask), entropy=masked_fp32(entropy, mask), seq_log_ratio=seq)
    w = aggregation_weights(mask, loss_agg, num_items)
    return PolicyOutput((w * per_token).sum(), policy_metrics(pieces, mask))


def value_loss(values, old_values, returns, mask, *, clip=0.2, loss_agg="token-mean", num_items=None):
    """PPO value-head loss (TRL / verl): ``0.5 * max((v - R)^2, (v_clip - R)^2)``, v_clip = old_values +
    clamp(values - old_values, -clip, clip), aggregated like ``ppo_loss``. ``clip=None`` drops the clipped
    term. Returns ``PolicyOutput(loss, {"vf_clipfrac", "vpred"})``.
    """
    if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
        raise TypeError(f"values must be a floating-point torch.Tensor, got "
                        f"{getattr(values, 'dtype', type(values).__name__)}")
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    for name, t in (("old_values", old_values), ("returns", returns)):
        _check_tensor(name, t, values.shape, values.device)
    _check_tensor("mask", mask, values.shape, values.device, floating=False)
    _check_number("clip", clip, allow_none=True)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGGS)}")
    _check_number("num_items", num_items, allow_none=True)
    mask = mask.bool()
    v, ret = masked_fp32(values, mask), masked_fp32(returns, mask)
    loss = (v - ret) ** 2
    clipfrac = torch.zeros((), device=v.device)
    m = mask.float()
    if clip is not None:
        old = masked_fp32(old_values, mask)
        clipped = (old + (v - old).clamp(-clip, clip) - ret) ** 2
        clipfrac = ((clipped > loss).float() * m).sum() / m.sum().clamp(min=1)
        loss = torch.maximum(loss, clipped)
    w = aggregation_weights(mask, loss_agg, num_items)
    metrics = {"vf_clipfrac": clipfrac, "vpred": (v.detach() * m).sum() / m.sum().clamp(min=1)}
    return PolicyOutput(0.5 * (w * loss).sum(), metrics)
