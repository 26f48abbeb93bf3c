"""Pure-PyTorch row kernels: the oracle for every other backend and the ``torch`` backend itself.

Contracts here: ``row_*`` (log-probs, below), ``div_*`` (full-vocabulary divergences) and ``pair_forward``
(the pairwise preference losses), each stated above its functions.

Row-kernel contract (shared by ``kernels/cpu.py``, ``kernels/triton/logprobs.py`` and this file):

``row_forward(x, labels, *, temperature, softcap, ignore_index, with_entropy) -> (logp, lse, entropy)``
    x: [n, V] float16/bfloat16/float32 raw logits, last dim contiguous, any row stride.
    labels: [n] integer (any width), each in [0, V) or == ignore_index (validated by the caller).
    Returns fp32 [n] tensors; ``entropy`` is None unless ``with_entropy``. Ignored rows give
    logp = 0, entropy = 0 and lse = 0 (their logits are never read).

``row_backward(x, labels, lse, entropy, grad_logp, grad_entropy, out, *, temperature, softcap, ignore_index)``
    Writes dL/dx into ``out`` ([n, V], any float dtype, last dim contiguous, may alias ``x``: every
    element is read before it is written). ``entropy`` / ``grad_entropy`` may be None (no entropy term),
    ``grad_logp`` may be None (no log-prob term). Ignored rows get zeros.

Math (z = softcap(x) / temperature, softcap(x) = c * tanh(x / c) when c > 0, else x;
p = softmax(z), mu = sum_v p_v z_v = lse - H):
    logp = z_y - lse,   H = lse - mu,
    dL/dz_v = g_logp * (1[v == y] - p_v) - g_H * p_v * (z_v - mu),
    dL/dx_v = dL/dz_v / temperature * (1 - tanh(x_v / c)^2 when softcapped).
"""
from __future__ import annotations

import torch

# Rows per step, so fp32 temporaries stay near 64 MiB however many rows a call has.
_TEMP_BYTES = 64 << 20
# The floor of log-probabilities and logit differences where a -inf logit (a masked vocabulary entry, p = 0)
# would otherwise meet a 0 in a product.
_LOG_ZERO = torch.finfo(torch.float32).min


def _rows_per_step(n: int, V: int) -> int:
    return max(1, min(n, _TEMP_BYTES // (4 * max(V, 1))))


def _scaled(x: torch.Tensor, temperature: float, softcap: float) -> torch.Tensor:
    z = x.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def row_forward(x, labels, *, temperature=1.0, softcap=0.0, ignore_index=-100, with_entropy=False):
    n = x.shape[0]
    logp = torch.zeros(n, dtype=torch.float32, device=x.device)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if with_entropy else None
    step = _rows_per_step(n, x.shape[1])
    for s in range(0, n, step):
        e = min(n, s + step)
        y = labels[s:e].long()  # gather and scatter index with int64 alone
        keep = y != ignore_index
        z = _scaled(x[s:e], temperature, softcap)
        m = torch.logsumexp(z, dim=-1)
        zy = z.gather(1, torch.where(keep, y, 0).unsqueeze(1)).squeeze(1)
        lse[s:e] = torch.where(keep, m, 0.0)
        logp[s:e] = torch.where(keep, zy - m, 0.0)
        if with_entropy:
            # -sum p (z - lse) rather than lse - sum p z: no cancellation when the logits are large. The floor
            # makes a -inf logit's term 0 (p = 0) rather than 0 * inf, and keeps NaN.
            zc = (z - m.unsqueeze(1)).clamp_min(_LOG_ZERO)
            h = -(zc.exp() * zc).sum(-1)
            entropy[s:e] = torch.where(keep, h, 0.0)
    return logp, lse, entropy


def row_backward(x, labels, lse, entropy, grad_logp, grad_entropy, out, *, temperature=1.0, softcap=0.0,
                 ignore_index=-100):
    n = x.shape[0]
    step = _rows_per_step(n, x.shape[1])
    for s in range(0, n, step):
        e = min(n, s + step)
        y = labels[s:e].long()
        keep = (y != ignore_index).unsqueeze(1)
        z = _scaled(x[s:e], temperature, softcap)
        p = torch.exp(z - lse[s:e].unsqueeze(1))
        g = torch.zeros_like(z)
        if grad_logp is not None:
            gl = grad_logp[s:e].unsqueeze(1)
            g -= gl * p
            g.scatter_add_(1, torch.where(keep.squeeze(1), y, 0).unsqueeze(1), gl)
        if grad_entropy is not None and entropy is not None:
            mu = (lse[s:e] - entropy[s:e]).unsqueeze(1)
            g -= grad_entropy[s:e].unsqueeze(1) * p * (z - mu).clamp_min(_LOG_ZERO)
        if temperature != 1.0:
            g /= temperature
        if softcap > 0:
            g *= 1.0 - torch.tanh(x[s:e].float() / softcap) ** 2
        out[s:e] = torch.where(keep, g, 0.0).to(out.dtype)


# Full-vocabulary f-divergences. Contract shared with kernels/cpu.py and kernels/triton/divergence.py:
#
# div_forward(x, xr, labels, *, div_id, param, temperature, ignore_index) -> (value, lse, lse_r, s_a, s_b)
#     x, xr: [n, V] policy and reference logits (fp32/bf16/fp16, may differ; last dim contiguous).
#     labels: [n] int64 or None; rows with labels == ignore_index give 0 everywhere and are never read.
#     value = sum_v qf_v = D_f(p || q); s_a = sum_v pa_v; s_b = sum_v qb_v (terms: fastpref.divergences),
#     p = softmax(x / T), q = softmax(xr / T). All outputs fp32 [n].
# div_backward(x, xr, labels, lse, lse_r, s_a, s_b, grad, out_x, out_xr, *, div_id, param, temperature,
#              ignore_index) -> None
#     out_x = grad * (pa - p * s_a) / T, out_xr = grad * (qb - q * s_b) / T, written in their dtype;
#     either may be None (not needed) and may alias x / xr. Masked rows get zeros.


def _log_probs(z, lse):
    """z - lse with -inf (a masked vocabulary entry) raised to the lowest finite value: its p is still 0, and
    the terms' products with it are 0 or, where the divergence is infinite, overflow to inf, rather than
    0 * inf = NaN. NaN stays NaN."""
    return (z - lse[:, None]).clamp_min(_LOG_ZERO)


def div_forward(x, xr, labels, *, div_id, param, temperature=1.0, ignore_index=-100):
    from fastpref.divergences import BY_KERNEL_ID

    terms = BY_KERNEL_ID[div_id].terms
    n = x.shape[0]
    outs = [torch.zeros(n, dtype=torch.float32, device=x.device) for _ in range(5)]
    step = _rows_per_step(n, x.shape[1])
    for s in range(0, n, step):
        e = min(n, s + step)
        keep = torch.ones(e - s, dtype=torch.bool, device=x.device) if labels is None else labels[s:e] != ignore_index
        z, zr = _scaled(x[s:e], temperature, 0.0), _scaled(xr[s:e], temperature, 0.0)
        lse, lse_r = torch.logsumexp(z, -1), torch.logsumexp(zr, -1)
        qf, pa, qb = terms(_log_probs(z, lse), _log_probs(zr, lse_r), param)
        for out, v in zip(outs, (qf.sum(-1), lse, lse_r, pa.sum(-1), qb.sum(-1))):
            out[s:e] = torch.where(keep, v, 0.0)
    return tuple(outs)


def div_backward(x, xr, labels, lse, lse_r, s_a, s_b, grad, out_x, out_xr, *, div_id, param, temperature=1.0,
                 ignore_index=-100):
    from fastpref.divergences import BY_KERNEL_ID

    terms = BY_KERNEL_ID[div_id].terms
    n = x.shape[0]
    step = _rows_per_step(n, x.shape[1])
    for s in range(0, n, step):
        e = min(n, s + step)
        keep = torch.ones(e - s, dtype=torch.bool, device=x.device) if labels is None else labels[s:e] != ignore_index
        keep = keep[:, None]
        lp = _log_probs(_scaled(x[s:e], temperature, 0.0), lse[s:e])
        lq = _log_probs(_scaled(xr[s:e], temperature, 0.0), lse_r[s:e])
        _, pa, qb = terms(lp, lq, param)
        g = grad[s:e, None] / temperature
        if out_x is not None:
            out_x[s:e] = torch.where(keep, g * (pa - lp.exp() * s_a[s:e, None]), 0.0).to(out_x.dtype)
        if out_xr is not None:
            out_xr[s:e] = torch.where(keep, g * (qb - lq.exp() * s_b[s:e, None]), 0.0).to(out_xr.dtype)


# Pairwise preference losses. Contract shared with kernels/triton/pairwise.py:
#
# pair_forward(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_lengths=None, rejected_lengths=None,
#              margin=None, *, loss_type, beta=1.0, label_smoothing=0.0, div_id=0, param=0.0, gamma=0.5,
#              tau=0.05, center_coef=0.0) -> (loss, grad_chosen, grad_rejected)
#     chosen, rejected: [B] sequence log-probs (bt: rewards), fp32/bf16/fp16. loss_type: one of
#     fastpref.ops.preference.PAIRWISE_TYPES ("bt" is bt_loss's Bradley-Terry). ref_*: [B] reference
#     log-probs, given exactly for the types with a reference (all but simpo and bt). *_lengths: [B] fp32
#     completion lengths (clamped to >= 1) for ipo, sigmoid_norm and simpo, else None. margin (bt only):
#     None, a number or a tensor ([] or [B]). div_id / param: the divergence score (fastpref.divergences
#     kernel id and its parameter; reverse_kl for the non-score types). Options as in dpo_loss / bt_loss.
#     Returns fp32 [B]: each pair's loss and its partial derivatives in chosen[i] and rejected[i]. (This
#     twin computes in float64 when ``chosen`` is float64: the tests' float64 oracle.)


def pair_forward(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_lengths=None, rejected_lengths=None,
                 margin=None, *, loss_type, beta=1.0, label_smoothing=0.0, div_id=0, param=0.0, gamma=0.5, tau=0.05,
                 center_coef=0.0):
    # Autograd over ops/preference.py's formulas: a pair's loss depends on that pair only, so the gradient
    # of the sum holds each pair's derivatives.
    from fastpref.divergences import BY_KERNEL_ID
    from fastpref.ops import preference

    if loss_type not in preference.PAIRWISE_TYPES:
        raise ValueError(f"loss_type {loss_type!r} has no pairwise kernel; covered: {preference.PAIRWISE_TYPES}")
    dt = torch.float64 if chosen.dtype == torch.float64 else torch.float32
    lw, ll = (None, None) if chosen_lengths is None else (chosen_lengths.to(dt), rejected_lengths.to(dt))
    with torch.enable_grad():
        cw = chosen.detach().to(dt).requires_grad_()
        cl = rejected.detach().to(dt).requires_grad_()
        if loss_type == "bt":
            if margin is not None:
                margin = torch.as_tensor(margin, device=cw.device, dtype=dt)
            loss = preference._bt_per_pair(cw, cl, margin, center_coef)
        elif loss_type == "simpo":
            loss = preference._reference_free(loss_type, cw, cl, lw, ll, beta, label_smoothing, {"gamma": gamma})
        else:
            score = BY_KERNEL_ID[div_id].score
            loss = preference._per_pair(loss_type, cw - ref_chosen.to(dt), cl - ref_rejected.to(dt), None, None,
                                        lambda r: score(r, param), beta, label_smoothing, {"tau": tau}, lw, ll)
        grad_chosen, grad_rejected = torch.autograd.grad(loss.sum(), (cw, cl))
    return loss.detach(), grad_chosen, grad_rejected
