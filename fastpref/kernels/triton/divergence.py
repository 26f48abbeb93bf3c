"""Triton twin of ``kernels/reference.py``'s ``div_forward`` / ``div_backward`` (contract: that module).

One program per row pair (policy logits x, reference logits xr), looping over the vocabulary in ``BLOCK_V``
chunks, all arithmetic fp32 in base 2 like ``logprobs.py``: w = z * log2(e), l2p = log2 p = w - lse2.

Forward. Reverse and forward KL need a single pass: their value is an expectation of z - zr under p (or
zr - z under q) minus a difference of log-sum-exps, so one online-softmax sweep that also carries the
rescaled weighted sum gives it, and s_a, s_b follow in closed form. The other divergences need p and q
themselves, so a first sweep finds both log-sum-exps and a second sums qf, pa and qb.

Backward. One sweep recomputes p, q and the terms and writes out_x = grad (pa - p s_a) / T and
out_xr = grad (qb - q s_b) / T, each element read before its gradient is written (in place is allowed).

The terms are evaluated from d2 = log2(p / q) = (w - wr) - (lse2 - lse2_r), not from the difference of two
log-probabilities: the logit difference keeps its precision whatever the logits' magnitude, and identical
rows give d2 = 0 exactly, hence value 0 and zero gradients rather than rounding noise.

``launch_configs()`` lists every compiled variant the launchers can ask for (see ``_aot.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpref.divergences import BY_KERNEL_ID, REGISTRY
from fastpref.kernels.triton.logprobs import _DTYPES, _LOG2E, LN2, LOG2E, NEG_BIG
from fastpref.kernels.triton.logprobs import _check_rows as _check_layout

DIV_REVERSE_KL: tl.constexpr = tl.constexpr(REGISTRY["reverse_kl"].kernel_id)
DIV_FORWARD_KL: tl.constexpr = tl.constexpr(REGISTRY["forward_kl"].kernel_id)
DIV_JS: tl.constexpr = tl.constexpr(REGISTRY["js"].kernel_id)
DIV_ALPHA: tl.constexpr = tl.constexpr(REGISTRY["alpha"].kernel_id)
DIV_TV: tl.constexpr = tl.constexpr(REGISTRY["tv"].kernel_id)
DIV_HELLINGER: tl.constexpr = tl.constexpr(REGISTRY["hellinger"].kernel_id)

# (largest V, BLOCK_V, num_warps), first match wins; every entry multiplies the AOT check's variants.
# Elements per thread per row per block are whole 16-byte chunks for every dtype (8 or 16), so aligned rows
# keep 128-bit loads and stores, and the two-row working set stays spill-free (``python -m
# fastpref.kernels.triton._aot``). For large vocabularies 2048 x 4 warps (16 per thread, two rows) was the
# fastest on an H200 (benchmarks/tune_row_kernels.py, N = 8192, V = 128256, bf16, reverse KL: forward
# 1.283 ms against 1.471 for 2048 x 8, forward+backward 2.821 against 3.005): fewer warps per row wait less
# at each block's max, and each thread has twice the bytes in flight. Vocabularies up to 1024 take one
# 1024-wide block rather than a mostly masked 2048 one.
_CONFIGS = (
    (1024, 1024, 4),
    (None, 2048, 4),
)


def _config(V: int) -> tuple[int, int]:
    return next((block_v, num_warps) for v_max, block_v, num_warps in _CONFIGS if v_max is None or V <= v_max)


@triton.jit
def _terms(l2p, l2q, d2, param, k0, k1, DIV: tl.constexpr):
    """(p, q, qf, pa, qb) of ``fastpref.divergences`` from base-2 log-probabilities and d2 = log2(p / q).

    k0, k1 are ``_coefficients()``'s per-divergence constants. js and alpha take qf = pa + qb (an identity
    of every f-divergence, since p = q u): for js it is the registry's own formula, for alpha it adds terms
    of size |p - q| rather than of size p, so it loses less to cancellation when p ~ q.
    """
    p = tl.exp2(l2p)
    q = tl.exp2(l2q)
    if DIV == DIV_REVERSE_KL:
        qf = p * (d2 * LN2)
        pa = qf + p
        qb = -p
    elif DIV == DIV_FORWARD_KL:
        qf = -q * (d2 * LN2)
        pa = -q
        qb = qf + q
    elif DIV == DIV_JS:
        # h = log2(m / p) = log2(beta + (1 - beta) 2^-d2), so lp - lm = -h ln2 and lq - lm = -(d2 + h) ln2.
        # With l = log2(1 - c (1 - 2^-|d2|)) (c = 1 - beta if d2 >= 0, else beta; its argument lies in (0, 1]
        # whatever d2, and d2 = 0 gives 0 exactly): h = l and d2 + h = d2 + l for d2 >= 0, h = l - d2 and
        # d2 + h = l below, where forming l - d2 and adding d2 back would cancel (q's term would lose
        # ulp(|d2|) of its size l).
        pos = d2 >= 0.0
        l2 = tl.log2(1.0 - tl.where(pos, k0, param) * (1.0 - tl.exp2(-tl.abs(d2))))
        h = tl.where(pos, l2, l2 - d2)
        hq = tl.where(pos, d2 + l2, l2)
        pa = -(param * LN2) * p * h
        qb = -(k0 * LN2) * q * hq
        qf = pa + qb
    elif DIV == DIV_ALPHA:
        # w = p^a q^(1-a) = q 2^(a d2): bounded by max(p, q), and exactly q (hence p) when d2 = 0.
        w = tl.exp2(l2q + param * d2)
        pa = (w - p) * k0
        qb = (q - w) * k1
        qf = pa + qb
    elif DIV == DIV_TV:
        diff = p - q
        half_sign = tl.where(diff > 0.0, 0.5, tl.where(diff < 0.0, -0.5, 0.0))
        qf = tl.abs(diff) * 0.5
        pa = p * half_sign
        qb = -q * half_sign
    else:
        tl.static_assert(DIV == DIV_HELLINGER)
        # Square roots of p and q rather than p + q - 2 sqrt(pq): (sp - sq)^2 has no cancellation.
        sp = tl.exp2(l2p * 0.5)
        sq = tl.exp2(l2q * 0.5)
        diff = sp - sq
        qf = diff * diff
        pa = sp * diff
        qb = -sq * diff
    return p, q, qf, pa, qb


@triton.jit
def _load_rows(x_row, xr_row, v0, cols, V, TAIL: tl.constexpr):
    """One block of both rows as fp32 raw logits. Only the last, partial block (TAIL) masks its loads, its
    lanes past V taking NEG_BIG (scaled, it may overflow to -inf: its exp2 is still 0, and x - xr = 0 there);
    the full blocks before it pay no mask, select or predicate per element."""
    if TAIL:
        idx = v0 + cols
        x = tl.where(idx < V, tl.load(x_row + idx, mask=idx < V, other=0.0).to(tl.float32), NEG_BIG)
        xr = tl.where(idx < V, tl.load(xr_row + idx, mask=idx < V, other=0.0).to(tl.float32), NEG_BIG)
    else:
        x = tl.load(x_row + v0 + cols).to(tl.float32)
        xr = tl.load(xr_row + v0 + cols).to(tl.float32)
    return x, xr


@triton.jit
def _online_block(x, xr, c, m, mr, s_acc, sr_acc, t_acc, DIV: tl.constexpr):
    """One block of the forward's online softmax over raw logits, in base 2 (c = log2(e) / T): maxima m, mr
    of w = x c (c > 0 and monotonic rounding: the max of the scaled logits is the scaled max), per-lane sums
    of 2^(w - m) with each exponent one FFMA on the raw logit, and for the KLs the expectation of x - xr in
    raw units (scaled once per row)."""
    m_new = tl.maximum(m, tl.max(x, axis=0) * c)
    mr_new = tl.maximum(mr, tl.max(xr, axis=0) * c)
    alpha = tl.exp2(m - m_new)
    alpha_r = tl.exp2(mr - mr_new)
    e = tl.exp2(tl.fma(x, c, -m_new))
    er = tl.exp2(tl.fma(xr, c, -mr_new))
    s_acc = s_acc * alpha + e
    sr_acc = sr_acc * alpha_r + er
    # KL's expectation rides along, rescaled with the sum whose weights it uses. A -inf logit has weight 0 and
    # a difference of -inf (NaN with both -inf), which NEG_BIG's floor turns into a term of 0, not NaN; +inf
    # (q = 0 < p) stays: the divergence is infinite.
    if DIV == DIV_REVERSE_KL:
        t_acc = t_acc * alpha + e * tl.maximum(x - xr, NEG_BIG)
    elif DIV == DIV_FORWARD_KL:
        t_acc = t_acc * alpha_r + er * tl.maximum(xr - x, NEG_BIG)
    return m_new, mr_new, s_acc, sr_acc, t_acc


@triton.jit
def _terms_raw(x, xr, c, lse2, lse2_r, dl, param, k0, k1, DIV: tl.constexpr):
    """``_terms`` of raw logits: log2 p = x c - lse2 and d2 = (x - xr) c - dl, each one FFMA (x - xr is
    exact for 16-bit logits, and 0 for identical rows, whose d2 is then exactly 0). d2 is held to the finite
    [NEG_BIG, -NEG_BIG], which finite logits never leave (the KL and alpha terms need their exact d2 even
    where the other side's probability underflows): a -inf logit's infinite d2 (NaN with both -inf) then
    meets its zero weight as a finite number, and each term takes its limit rather than 0 * inf."""
    d2 = tl.minimum(tl.maximum(tl.fma(x - xr, c, -dl), NEG_BIG), -NEG_BIG)
    return _terms(tl.fma(x, c, -lse2), tl.fma(xr, c, -lse2_r), d2, param, k0, k1, DIV)


@triton.jit
def _terms_block(x_row, xr_row, v0, cols, V, c, lse2, lse2_r, dl, param, k0, k1, qf_acc, pa_acc, qb_acc,
                 DIV: tl.constexpr, TAIL: tl.constexpr):
    """The forward's second pass over one block: the per-lane sums of qf, pa and qb."""
    x, xr = _load_rows(x_row, xr_row, v0, cols, V, TAIL)
    _, _, qf, pa, qb = _terms_raw(x, xr, c, lse2, lse2_r, dl, param, k0, k1, DIV)
    return qf_acc + qf, pa_acc + pa, qb_acc + qb


@triton.jit
def _div_fwd_kernel(
    x_ptr, xr_ptr, labels_ptr, value_ptr, lse_ptr, lse_r_ptr, sa_ptr, sb_ptr,
    V, stride_x, stride_xr, ignore_index,
    scale, param, k0, k1,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    v_end = V
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
        # Masked rows run zero iterations: their logits are never read.
        v_end = tl.where(keep, V, 0)
    v_full = v_end - v_end % BLOCK_V
    x_row = x_ptr + row * stride_x
    xr_row = xr_ptr + row * stride_xr
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), NEG_BIG, tl.float32)
    mr = tl.full((), NEG_BIG, tl.float32)
    s_acc = tl.zeros((BLOCK_V,), tl.float32)
    sr_acc = tl.zeros((BLOCK_V,), tl.float32)
    t_acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, v_full, BLOCK_V):
        x, xr = _load_rows(x_row, xr_row, v0, cols, V, False)
        m, mr, s_acc, sr_acc, t_acc = _online_block(x, xr, scale, m, mr, s_acc, sr_acc, t_acc, DIV)
    if v_full < v_end:
        x, xr = _load_rows(x_row, xr_row, v_full, cols, V, True)
        m, mr, s_acc, sr_acc, t_acc = _online_block(x, xr, scale, m, mr, s_acc, sr_acc, t_acc, DIV)
    s = tl.sum(s_acc, axis=0)
    sr = tl.sum(sr_acc, axis=0)
    if HAS_LABELS:
        # A masked row summed nothing; 1 keeps its discarded results finite (no log2(0), no 0/0).
        s = tl.where(keep, s, 1.0)
        sr = tl.where(keep, sr, 1.0)
    lse2 = m + tl.log2(s)
    lse2_r = mr + tl.log2(sr)
    dl = lse2 - lse2_r
    if DIV == DIV_REVERSE_KL:
        # sum p (lp - lq) = E_p[z - zr] - (lse - lse_r); pa = p (lp - lq + 1), qb = -p.
        value = (tl.sum(t_acc, axis=0) * scale / s - dl) * LN2
        s_a = value + 1.0
        s_b = tl.full((), -1.0, tl.float32)
    elif DIV == DIV_FORWARD_KL:
        value = (tl.sum(t_acc, axis=0) * scale / sr + dl) * LN2
        s_a = tl.full((), -1.0, tl.float32)
        s_b = value + 1.0
    else:
        qf_acc = tl.zeros((BLOCK_V,), tl.float32)
        pa_acc = tl.zeros((BLOCK_V,), tl.float32)
        qb_acc = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, v_full, BLOCK_V):
            qf_acc, pa_acc, qb_acc = _terms_block(x_row, xr_row, v0, cols, V, scale, lse2, lse2_r, dl, param, k0,
                                                  k1, qf_acc, pa_acc, qb_acc, DIV, False)
        if v_full < v_end:
            qf_acc, pa_acc, qb_acc = _terms_block(x_row, xr_row, v_full, cols, V, scale, lse2, lse2_r, dl, param, k0,
                                                  k1, qf_acc, pa_acc, qb_acc, DIV, True)
        value = tl.sum(qf_acc, axis=0)
        s_a = tl.sum(pa_acc, axis=0)
        s_b = tl.sum(qb_acc, axis=0)
    lse = lse2 * LN2
    lse_r = lse2_r * LN2
    if HAS_LABELS:
        value = tl.where(keep, value, 0.0)
        lse = tl.where(keep, lse, 0.0)
        lse_r = tl.where(keep, lse_r, 0.0)
        s_a = tl.where(keep, s_a, 0.0)
        s_b = tl.where(keep, s_b, 0.0)
    tl.store(value_ptr + row, value)
    tl.store(lse_ptr + row, lse)
    tl.store(lse_r_ptr + row, lse_r)
    tl.store(sa_ptr + row, s_a)
    tl.store(sb_ptr + row, s_b)


@triton.jit
def _store_rows(out_x_row, out_xr_row, v0, cols, V, gx, gxr, HAS_OUT_X: tl.constexpr, HAS_OUT_XR: tl.constexpr,
                TAIL: tl.constexpr):
    idx = v0 + cols
    if HAS_OUT_X:
        if TAIL:
            tl.store(out_x_row + idx, gx.to(out_x_row.dtype.element_ty), mask=idx < V)
        else:
            tl.store(out_x_row + idx, gx.to(out_x_row.dtype.element_ty))
    if HAS_OUT_XR:
        if TAIL:
            tl.store(out_xr_row + idx, gxr.to(out_xr_row.dtype.element_ty), mask=idx < V)
        else:
            tl.store(out_xr_row + idx, gxr.to(out_xr_row.dtype.element_ty))


@triton.jit
def _grad_block(x_row, xr_row, out_x_row, out_xr_row, v0, cols, V, c, lse2, lse2_r, dl, g, s_a, s_b, param, k0, k1,
                DIV: tl.constexpr, HAS_OUT_X: tl.constexpr, HAS_OUT_XR: tl.constexpr, TAIL: tl.constexpr):
    # Both rows are read (into registers) before either gradient is stored: out may be x or xr itself.
    x, xr = _load_rows(x_row, xr_row, v0, cols, V, TAIL)
    p, q, _, pa, qb = _terms_raw(x, xr, c, lse2, lse2_r, dl, param, k0, k1, DIV)
    _store_rows(out_x_row, out_xr_row, v0, cols, V, g * (pa - p * s_a), g * (qb - q * s_b), HAS_OUT_X, HAS_OUT_XR,
                TAIL)


@triton.jit
def _div_bwd_kernel(
    x_ptr, xr_ptr, labels_ptr, lse_ptr, lse_r_ptr, sa_ptr, sb_ptr, grad_ptr, out_x_ptr, out_xr_ptr,
    V, stride_x, stride_xr, stride_out_x, stride_out_xr, ignore_index,
    scale, inv_temperature, param, k0, k1,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_OUT_X: tl.constexpr, HAS_OUT_XR: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    xr_row = xr_ptr + row * stride_xr
    out_x_row = out_x_ptr + row * stride_out_x
    out_xr_row = out_xr_ptr + row * stride_out_xr
    cols = tl.arange(0, BLOCK_V)
    keep = True
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
    if keep:
        g = tl.load(grad_ptr + row) * inv_temperature
        lse2 = tl.load(lse_ptr + row) * LOG2E
        lse2_r = tl.load(lse_r_ptr + row) * LOG2E
        s_a = tl.load(sa_ptr + row)
        s_b = tl.load(sb_ptr + row)
        dl = lse2 - lse2_r
        v_full = V - V % BLOCK_V
        for v0 in range(0, v_full, BLOCK_V):
            _grad_block(x_row, xr_row, out_x_row, out_xr_row, v0, cols, V, scale, lse2, lse2_r, dl, g, s_a, s_b,
                        param, k0, k1, DIV, HAS_OUT_X, HAS_OUT_XR, False)
        if v_full < V:
            _grad_block(x_row, xr_row, out_x_row, out_xr_row, v_full, cols, V, scale, lse2, lse2_r, dl, g, s_a, s_b,
                        param, k0, k1, DIV, HAS_OUT_X, HAS_OUT_XR, True)
    else:
        # A masked row's gradients are zeros, written without reading its logits or its per-row scalars
        # (whatever the caller left there, NaN included).
        zeros = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            _store_rows(out_x_row, out_xr_row, v0, cols, V, zeros, zeros, HAS_OUT_X, HAS_OUT_XR, True)


def _check_rows(t: torch.Tensor, name: str, shape=None) -> None:
    _check_layout(t, name)
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} != x shape {tuple(shape)}")


def _coefficients(div_id: int, param: float) -> tuple[float, float]:
    """(k0, k1) for ``_terms``, from the parameter in double: js (1 - beta, unused), alpha
    (1 / (alpha - 1), 1 / alpha) so that the kernel multiplies instead of dividing, none for the others."""
    if div_id not in BY_KERNEL_ID:
        raise ValueError(f"unknown divergence kernel id {div_id!r}; valid: {sorted(BY_KERNEL_ID)}")
    if div_id == DIV_JS.value:
        return 1.0 - param, 0.0
    if div_id == DIV_ALPHA.value:
        return 1.0 / (param - 1.0), 1.0 / param
    return 0.0, 0.0


def _row_vec(t: torch.Tensor) -> torch.Tensor:
    # Per-row scalars may arrive expanded (stride 0) or in another float dtype; one fp32 layout keeps the
    # compiled variants to those launch_configs() lists.
    return t.to(torch.float32).contiguous()


def div_forward(x, xr, labels, *, div_id, param, temperature=1.0, ignore_index=-100):
    _check_rows(x, "x")
    _check_rows(xr, "xr", x.shape)
    k0, k1 = _coefficients(div_id, param)
    n, V = x.shape
    value, lse, lse_r, s_a, s_b = (torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(5))
    if n == 0:
        return value, lse, lse_r, s_a, s_b
    block_v, num_warps = _config(V)
    # Without labels the pointer slot gets value: a None would compile a separate variant.
    labels_arg = value if labels is None else labels.to(torch.int64).contiguous()
    _div_fwd_kernel[(n,)](
        x, xr, labels_arg, value, lse, lse_r, s_a, s_b,
        V, x.stride(0), xr.stride(0), ignore_index,
        _LOG2E / temperature, float(param), k0, k1,
        DIV=div_id, HAS_LABELS=labels is not None, BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return value, lse, lse_r, s_a, s_b


def div_backward(x, xr, labels, lse, lse_r, s_a, s_b, grad, out_x, out_xr, *, div_id, param, temperature=1.0,
                 ignore_index=-100):
    _check_rows(x, "x")
    _check_rows(xr, "xr", x.shape)
    if out_x is not None:
        _check_rows(out_x, "out_x", x.shape)
    if out_xr is not None:
        _check_rows(out_xr, "out_xr", x.shape)
    k0, k1 = _coefficients(div_id, param)
    n, V = x.shape
    if n == 0 or (out_x is None and out_xr is None):
        return
    block_v, num_warps = _config(V)
    lse = _row_vec(lse)
    labels_arg = lse if labels is None else labels.to(torch.int64).contiguous()
    # A missing output's slot gets its input (same dtype, never written): one variant per flag, not per dtype.
    _div_bwd_kernel[(n,)](
        x, xr, labels_arg, lse, _row_vec(lse_r), _row_vec(s_a), _row_vec(s_b), _row_vec(grad),
        x if out_x is None else out_x, xr if out_xr is None else out_xr,
        V, x.stride(0), xr.stride(0), 0 if out_x is None else out_x.stride(0),
        0 if out_xr is None else out_xr.stride(0), ignore_index,
        _LOG2E / temperature, 1.0 / temperature, float(param), k0, k1,
        DIV=div_id, HAS_LABELS=labels is not None, HAS_OUT_X=out_x is not None, HAS_OUT_XR=out_xr is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers can launch.

    Each pointer takes its own dtype (fp32/bf16/fp16; an absent output has its input's), so the list is the
    full cross product: 216 forward and 3240 backward variants. Integer arguments are ``i32`` and
    pointers/V/strides 16-divisible, as in ``logprobs.launch_configs()``.
    """
    dtypes = list(_DTYPES.values())
    configs = []
    for _, block_v, num_warps in _CONFIGS:
        for div_id in sorted(BY_KERNEL_ID):
            for has_labels in (True, False):
                labels_ty = "*i64" if has_labels else "*fp32"
                for x_ty in dtypes:
                    for xr_ty in dtypes:
                        sig = {"x_ptr": f"*{x_ty}", "xr_ptr": f"*{xr_ty}", "labels_ptr": labels_ty,
                               "value_ptr": "*fp32", "lse_ptr": "*fp32", "lse_r_ptr": "*fp32", "sa_ptr": "*fp32",
                               "sb_ptr": "*fp32", "V": "i32", "stride_x": "i32", "stride_xr": "i32",
                               "ignore_index": "i32", "scale": "fp32", "param": "fp32", "k0": "fp32",
                               "k1": "fp32", "DIV": "constexpr", "HAS_LABELS": "constexpr", "BLOCK_V": "constexpr"}
                        const = {"DIV": div_id, "HAS_LABELS": has_labels, "BLOCK_V": block_v}
                        configs.append((_div_fwd_kernel, sig, const, num_warps))
                        for has_x, has_xr in ((True, True), (True, False), (False, True)):
                            for ox_ty in dtypes if has_x else [x_ty]:
                                for oxr_ty in dtypes if has_xr else [xr_ty]:
                                    sig = {"x_ptr": f"*{x_ty}", "xr_ptr": f"*{xr_ty}", "labels_ptr": labels_ty,
                                           "lse_ptr": "*fp32", "lse_r_ptr": "*fp32", "sa_ptr": "*fp32",
                                           "sb_ptr": "*fp32", "grad_ptr": "*fp32", "out_x_ptr": f"*{ox_ty}",
                                           "out_xr_ptr": f"*{oxr_ty}", "V": "i32", "stride_x": "i32",
                                           "stride_xr": "i32", "stride_out_x": "i32", "stride_out_xr": "i32",
                                           "ignore_index": "i32", "scale": "fp32", "inv_temperature": "fp32",
                                           "param": "fp32", "k0": "fp32", "k1": "fp32", "DIV": "constexpr",
                                           "HAS_LABELS": "constexpr", "HAS_OUT_X": "constexpr",
                                           "HAS_OUT_XR": "constexpr", "BLOCK_V": "constexpr"}
                                    const = {"DIV": div_id, "HAS_LABELS": has_labels, "HAS_OUT_X": has_x,
                                             "HAS_OUT_XR": has_xr, "BLOCK_V": block_v}
                                    configs.append((_div_bwd_kernel, sig, const, num_warps))
    return configs
