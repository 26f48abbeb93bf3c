"""Triton twin of ``kernels/reference.py``: the row-kernel contract (see that module's docstring).

One program per row, looping over the vocabulary in ``BLOCK_V`` chunks. The forward pass reads each logit
once (online softmax); the backward pass reads each logit once more and writes its gradient in place of the
logit when ``out`` aliases ``x``. All arithmetic is fp32 in base 2 (``w = z * log2(e)``), so every
exponential is a bare ``exp2`` and the conversions back to natural units happen once per row.

Under ``TRITON_INTERPRET=1`` (set before import) the same launchers run on CPU tensors; that is how CI
checks these kernels. ``launch_configs()`` lists every compiled variant the launchers can ask for, so that
``python -m fastpref.kernels.triton._aot`` can compile them all for real GPUs without one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(_LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Below this |u| the Taylor series of tanh is used: the exp form loses relative accuracy to cancellation
# in 1 - e as u -> 0 (and a softcapped logit near 0 would carry that error into logp), while at 0.25 the
# series' truncation error (~0.009 u^10 relative) is already far below fp32 epsilon.
TANH_SERIES_MAX: tl.constexpr = tl.constexpr(0.25)
# Finite stand-in for -inf (divergence.py's too): the running max starts there, so a block whose real logits
# are all -inf cannot produce exp2(-inf - -inf), and the lanes past V take it, so p (and q) = 0 there and every
# term is 0 * finite = 0 (never 0 * inf = nan) without a select per term.
NEG_BIG: tl.constexpr = tl.constexpr(-3.0e38)

# (largest V, BLOCK_V, num_warps), first match wins. The table is short because the AOT check compiles
# every variant. Both entries give each thread BLOCK_V / (32 * num_warps) = 8 or 16 elements, which Triton
# lays out as whole 16-byte chunks for every dtype, so aligned rows load and store with 128-bit accesses. 16 per
# thread amortises each block's max reduction over more data while the per-lane s/t accumulators and
# backward temporaries stay spill-free (see ``python -m fastpref.kernels.triton._aot``). Of the 16-per-thread
# shapes, 2048 x 4 warps was the fastest on an H200 (benchmarks/tune_row_kernels.py, N = 8192, V = 128256,
# bf16: forward 0.845 ms against 0.931 for 4096 x 8, forward+backward 1.995 against 2.110; more warps per row
# wait longer at each block's max). Vocabularies up to 1024 (classification / reward heads) take one
# 1024-wide block rather than a mostly masked 2048 one.
_CONFIGS = (
    (1024, 1024, 4),
    (None, 2048, 4),
)

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _config(V: int) -> tuple[int, int]:
    return next((block_v, num_warps) for v_max, block_v, num_warps in _CONFIGS if v_max is None or V <= v_max)


@triton.jit
def _tanh_sech2(u):
    """tanh(u) and 1 - tanh(u)^2 from one exp2 plus a short series near 0.

    libdevice's tanh cannot run in the interpreter, so both backends share this form.
    """
    a = tl.abs(u)
    e = tl.exp2(a * (-2.0 * LOG2E))  # exp(-2|u|), in (0, 1]
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < TANH_SERIES_MAX, small, big)
    t = tl.where(u < 0.0, -t, t)
    # 4e/(1+e)^2 == 1 - tanh^2 without the cancellation of 1 - t*t for large |u|.
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return t, sech2


@triton.jit
def _load_row(x_row, v0, cols, V, inv_softcap, SOFTCAP: tl.constexpr, TAIL: tl.constexpr):
    """One block of the row as fp32 logits, softcapped (c tanh(x / c), c folded into ``scale``). Only the last,
    partial block (TAIL) masks its loads; its lanes past V take NEG_BIG after the softcap (scaled, it may
    overflow to -inf: its exp2 is still 0). The full blocks before it pay no mask, select or predicate per
    element."""
    if TAIL:
        idx = v0 + cols
        x = tl.load(x_row + idx, mask=idx < V, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_row + v0 + cols).to(tl.float32)
    if SOFTCAP:
        x, _ = _tanh_sech2(x * inv_softcap)
    if TAIL:
        x = tl.where(v0 + cols < V, x, NEG_BIG)
    return x


@triton.jit
def _online_block(x, c, m, s_acc, t_acc, WITH_ENTROPY: tl.constexpr):
    """One block of the online softmax in base 2 (w = x c, c = ``scale``): the max m of w (c > 0 and
    monotonic rounding: the max of the scaled logits is the scaled max), per-lane sums of 2^(w - m), each
    exponent one FFMA, and for the entropy the expectation of x (scaled once per row)."""
    m_new = tl.maximum(m, tl.max(x, axis=0) * c)
    alpha = tl.exp2(m - m_new)
    e = tl.exp2(tl.fma(x, c, -m_new))
    # Per-lane accumulators rescaled by one scalar: one reduction per block (the max), not two or three.
    s_acc = s_acc * alpha + e
    if WITH_ENTROPY:
        # A -inf logit has weight 0: NEG_BIG's floor makes its term 0 rather than 0 * inf.
        t_acc = t_acc * alpha + e * tl.maximum(x, NEG_BIG)
    return m_new, s_acc, t_acc


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr,
    V, stride_x, ignore_index,
    scale, inv_softcap,
    SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # scale = log2(e) / T, or log2(e) * c / T with a softcap, so w = z * log2(e) is one multiply of x.
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    keep = y != ignore_index
    # Ignored rows run zero iterations: their logits are never read.
    v_end = tl.where(keep, V, 0)
    v_full = v_end - v_end % BLOCK_V
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), NEG_BIG, tl.float32)
    s_acc = tl.zeros((BLOCK_V,), tl.float32)
    t_acc = tl.zeros((BLOCK_V,), tl.float32)
    xy = tl.zeros((), tl.float32)
    for v0 in range(0, v_full, BLOCK_V):
        x = _load_row(x_row, v0, cols, V, inv_softcap, SOFTCAP, False)
        m, s_acc, t_acc = _online_block(x, scale, m, s_acc, t_acc, WITH_ENTROPY)
        # The label's logit comes from the block already in registers; the branch is taken once per row,
        # so its reduction is cheaper than carrying a per-lane vector through every iteration.
        if (y >= v0) & (y < v0 + BLOCK_V):
            xy = tl.sum(tl.where(v0 + cols == y, x, 0.0), axis=0)
    if v_full < v_end:
        x = _load_row(x_row, v_full, cols, V, inv_softcap, SOFTCAP, True)
        m, s_acc, t_acc = _online_block(x, scale, m, s_acc, t_acc, WITH_ENTROPY)
        if y >= v_full:
            xy = tl.sum(tl.where(v_full + cols == y, x, 0.0), axis=0)
    # An ignored row summed nothing; 1 keeps its discarded results finite (no log2(0), no 0/0).
    s = tl.where(keep, tl.sum(s_acc, axis=0), 1.0)
    lse2 = m + tl.log2(s)
    logp = (xy * scale - lse2) * LN2
    lse = lse2 * LN2
    tl.store(logp_ptr + row, tl.where(keep, logp, 0.0))
    tl.store(lse_ptr + row, tl.where(keep, lse, 0.0))
    if WITH_ENTROPY:
        ent = lse - tl.sum(t_acc, axis=0) * scale / s * LN2
        tl.store(ent_ptr + row, tl.where(keep, ent, 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, out_ptr,
    V, stride_x, stride_out, ignore_index,
    scale, inv_softcap, inv_temperature,
    SOFTCAP: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    keep = y != ignore_index
    lse2 = tl.where(keep, tl.load(lse_ptr + row) * LOG2E, 0.0)
    # Zero weights make every term of an ignored row 0 without reading its logits (its loads are masked
    # off, so w = 0, lse2 = 0 and p = 1 stay finite), while the stores still write its zeros.
    if HAS_GRAD_LOGP:
        gl = tl.where(keep, tl.load(glogp_ptr + row), 0.0)
    if HAS_ENTROPY:
        gh = tl.where(keep, tl.load(gent_ptr + row), 0.0)
        mu2 = lse2 - tl.load(ent_ptr + row) * LOG2E
    v_read = tl.where(keep, V, 0)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        x = tl.load(x_row + idx, mask=idx < v_read, other=0.0).to(tl.float32)
        if SOFTCAP:
            x, sech2 = _tanh_sech2(x * inv_softcap)
        w = x * scale
        p = tl.exp2(w - lse2)
        dz = tl.zeros((BLOCK_V,), tl.float32)
        if HAS_GRAD_LOGP:
            dz = gl * (tl.where(idx == y, 1.0, 0.0) - p)
        if HAS_ENTROPY:
            dz -= gh * p * (tl.maximum(w - mu2, NEG_BIG) * LN2)  # 0, not 0 * inf, at a -inf logit
        dx = dz * inv_temperature
        if SOFTCAP:
            dx *= sech2
        tl.store(out_row + idx, dx.to(out_ptr.dtype.element_ty), mask=idx < V)


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be [n, V] with a contiguous last dim, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32/bfloat16/float16, got {t.dtype}")


def _scales(temperature: float, softcap: float) -> tuple[float, float]:
    """(scale, inv_softcap) such that w = z * log2(e) is x * scale, or tanh(x * inv_softcap) * scale."""
    if softcap > 0:
        return _LOG2E * softcap / temperature, 1.0 / softcap
    return _LOG2E / temperature, 1.0


def _row_vec(t: torch.Tensor) -> torch.Tensor:
    # Per-row scalars may arrive expanded (stride 0, e.g. the grad of a sum) or in another float dtype;
    # one fp32 layout keeps the compiled variants to those launch_configs() lists.
    return t.to(torch.float32).contiguous()


def row_forward(x, labels, *, temperature=1.0, softcap=0.0, ignore_index=-100, with_entropy=False):
    _check_rows(x, "x")
    n, V = x.shape
    logp = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if n == 0:
        return logp, lse, entropy
    block_v, num_warps = _config(V)
    scale, inv_softcap = _scales(temperature, softcap)
    _logprobs_fwd_kernel[(n,)](
        x, labels.to(torch.int64).contiguous(), logp, lse, entropy if with_entropy else lse,
        V, x.stride(0), ignore_index,
        scale, inv_softcap,
        SOFTCAP=softcap > 0, WITH_ENTROPY=with_entropy, BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, lse, entropy


def row_backward(x, labels, lse, entropy, grad_logp, grad_entropy, out, *, temperature=1.0, softcap=0.0,
                 ignore_index=-100):
    _check_rows(x, "x")
    _check_rows(out, "out")
    n, V = x.shape
    if out.shape != x.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
    has_entropy = grad_entropy is not None and entropy is not None
    if n == 0:
        return
    if grad_logp is None and not has_entropy:
        out.zero_()
        return
    block_v, num_warps = _config(V)
    scale, inv_softcap = _scales(temperature, softcap)
    lse = _row_vec(lse)
    # Unused pointer slots get lse: a None would compile a separate variant per combination.
    glogp = _row_vec(grad_logp) if grad_logp is not None else lse
    ent = _row_vec(entropy) if has_entropy else lse
    gent = _row_vec(grad_entropy) if has_entropy else lse
    _logprobs_bwd_kernel[(n,)](
        x, labels.to(torch.int64).contiguous(), lse, ent, glogp, gent, out,
        V, x.stride(0), out.stride(0), ignore_index,
        scale, inv_softcap, 1.0 / temperature,
        SOFTCAP=softcap > 0, HAS_GRAD_LOGP=grad_logp is not None, HAS_ENTROPY=has_entropy,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers can launch for fp32/bf16/fp16 logits.

    Integer arguments appear as ``i32`` and pointers/V/strides as 16-divisible, the variant Triton's JIT
    specialises to for realistic shapes (vocabularies and row strides that are multiples of 16, rows
    under 2**31 elements). Its other integer specialisations (unaligned V or stride, a value of 1, i64)
    change only address arithmetic and vector widths, not the shape of the kernel.
    """
    configs = []
    for _, block_v, num_warps in _CONFIGS:
        for x_ty in _DTYPES.values():
            for softcap in (False, True):
                for with_entropy in (False, True):
                    sig = {"x_ptr": f"*{x_ty}", "labels_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                           "ent_ptr": "*fp32", "V": "i32", "stride_x": "i32", "ignore_index": "i32",
                           "scale": "fp32", "inv_softcap": "fp32", "SOFTCAP": "constexpr",
                           "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr"}
                    const = {"SOFTCAP": softcap, "WITH_ENTROPY": with_entropy, "BLOCK_V": block_v}
                    configs.append((_logprobs_fwd_kernel, sig, const, num_warps))
                for out_ty in _DTYPES.values():
                    for has_logp, has_ent in ((True, False), (False, True), (True, True)):
                        sig = {"x_ptr": f"*{x_ty}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                               "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "out_ptr": f"*{out_ty}",
                               "V": "i32", "stride_x": "i32", "stride_out": "i32", "ignore_index": "i32",
                               "scale": "fp32", "inv_softcap": "fp32", "inv_temperature": "fp32",
                               "SOFTCAP": "constexpr", "HAS_GRAD_LOGP": "constexpr", "HAS_ENTROPY": "constexpr",
                               "BLOCK_V": "constexpr"}
                        const = {"SOFTCAP": softcap, "HAS_GRAD_LOGP": has_logp, "HAS_ENTROPY": has_ent,
                                 "BLOCK_V": block_v}
                        configs.append((_logprobs_bwd_kernel, sig, const, num_warps))
    return configs
