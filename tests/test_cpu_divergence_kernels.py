"""The native CPU divergence row kernels (fastpref/kernels/cpu.py over csrc/divergence_cpu.cpp) against float64
formulas: log_softmax of the float64 logits and the registry's terms.

Most logits lie on a 1/32 grid inside (-8, 8), which fp32, bf16 and fp16 all hold exactly: every dtype then
describes the same distributions, and log p - log q takes few distinct values per row, so no element sits so
close to p = q that rounding could flip total variation's sign (its gradient is discontinuous there).
"""
import pytest
import torch

import fastpref
from fastpref.divergences import REGISTRY

if not fastpref.backends()["cpu"].available:
    pytest.skip(fastpref.backends()["cpu"].reason, allow_module_level=True)

from fastpref.kernels import cpu  # noqa: E402

# Non-default parameters, so a kernel that ignored them would fail.
DIVS = [("reverse_kl", 0.0), ("forward_kl", 0.0), ("js", 0.3), ("alpha", 0.7), ("tv", 0.0), ("hellinger", 0.0)]
DIV_IDS = [name for name, _ in DIVS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the gradients' dtype
# The per-row sums cancel (s_a, s_b near 0 for close p and q) and every log-probability is z - lse with an
# fp32 lse: fp32 epsilon times |lse| (~12 here) bounds their error absolutely.
ATOL = 2e-6
STATS = ("value", "lse", "lse_r", "s_a", "s_b")


def grid_logits(n, V, scale=2.0):
    top = 255 / 32
    x = ((torch.randn(n, V) * scale * 32).round() / 32).clamp(-top, top)
    xr = (x + (torch.randn(n, V) * 0.5 * 32).round() / 32).clamp(-top, top)
    return x, xr


def oracle(x, xr, labels, name, param, temperature, grad, ignore_index=-100):
    """(value, lse, lse_r, s_a, s_b, grad_x, grad_xr) in float64."""
    z, zr = x.double() / temperature, xr.double() / temperature
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    qf, pa, qb = REGISTRY[name].terms(lp, lq, param)
    s_a, s_b = pa.sum(-1), qb.sum(-1)
    g = grad.double()[:, None] / temperature
    outs = [qf.sum(-1), torch.logsumexp(z, -1), torch.logsumexp(zr, -1), s_a, s_b,
            g * (pa - lp.exp() * s_a[:, None]), g * (qb - lq.exp() * s_b[:, None])]
    keep = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    return [torch.where(keep.view(-1, *[1] * (o.dim() - 1)), o, 0.0) for o in outs]


def close(actual, expected, rtol, what, atol=0.0):
    """Relative error in norm (robust to the odd tiny element), with ``atol`` for values that are ~0."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).norm()
    assert err <= rtol * expected.norm() + atol, f"{what}: error {err:.3g} vs norm {expected.norm():.3g}"


def run(x, xr, labels, name, param, temperature=1.0, grad=None, outs=None, ignore_index=-100):
    """Forward, then backward into ``outs`` (default: NaN-filled tensors of the inputs' dtypes)."""
    div_id = REGISTRY[name].kernel_id
    fwd = cpu.div_forward(x, xr, labels, div_id=div_id, param=param, temperature=temperature,
                          ignore_index=ignore_index)
    if outs is None:
        outs = [torch.full(t.shape, float("nan"), dtype=t.dtype) for t in (x, xr)]
    cpu.div_backward(x, xr, labels, *fwd[1:], grad, *outs, div_id=div_id, param=param, temperature=temperature,
                     ignore_index=ignore_index)
    return list(fwd), outs


def labels_for(n, V, ignore_index=-100):
    labels = torch.randint(0, V, (n,))
    labels[::3] = ignore_index
    return labels


def check(fwd, outs, want, grad_rtol, atol=ATOL):
    for what, got, exp in zip(STATS, fwd, want):
        assert got.dtype == torch.float32 and got.shape == exp.shape, what
        close(got, exp, 1e-5, what, atol=atol)
    for what, got, exp in zip(("grad_x", "grad_xr"), outs, want[5:]):
        if got is not None:
            close(got, exp, grad_rtol[got.dtype] if isinstance(grad_rtol, dict) else grad_rtol, what, atol=atol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", [1, 7, 1000, 70001])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_matches_float64(name, param, dtype, V, temperature):
    n = 2 if V > 2048 else 7
    x, xr = grid_logits(n, V)
    labels = labels_for(n, V)
    grad = torch.randn(n)
    want = oracle(x, xr, labels, name, param, temperature, grad)
    fwd, outs = run(x.to(dtype), xr.to(dtype), labels, name, param, temperature, grad)
    # The inputs are exact in every dtype and the kernels compute in fp32: fp32 accuracy throughout, except
    # the gradients rounded to the inputs' dtype.
    assert outs[0].dtype == outs[1].dtype == dtype
    check(fwd, outs, want, RTOL)
    if V == 1:  # p = q = 1
        assert (fwd[0] == 0).all() and (outs[0] == 0).all() and (outs[1] == 0).all()


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_masked_rows_are_zero_and_never_read(name, param):
    n, V = 6, 3000
    x, xr = grid_logits(n, V)
    labels = labels_for(n, V, ignore_index=-1)
    grad = torch.randn(n)
    want = oracle(x, xr, labels, name, param, 0.7, grad, ignore_index=-1)
    masked = labels == -1
    x[masked] = float("nan")
    xr[masked] = float("nan")
    fwd, outs = run(x, xr, labels, name, param, 0.7, grad, ignore_index=-1)
    check(fwd, outs, want, 1e-5)
    assert all((t[masked] == 0).all() for t in fwd + outs)
    # Whatever the caller leaves in a masked row's per-row inputs is not used either.
    stats = [torch.where(masked, float("nan"), t) for t in fwd[1:] + [grad]]
    out = torch.full_like(outs[0], float("nan"))
    cpu.div_backward(x, xr, labels, *stats, out, None, div_id=REGISTRY[name].kernel_id, param=param,
                     temperature=0.7, ignore_index=-1)
    assert torch.equal(out, outs[0])


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_layouts_dtypes_and_optional_arguments(name, param):
    n, V = 5, 2500
    x, xr = grid_logits(n, V)
    grad = torch.randn(n)
    want = oracle(x, xr, None, name, param, 1.0, grad)
    # Padded rows with different strides, mixed input dtypes, outputs in other dtypes and padded, no labels.
    xb = torch.zeros(n, V + 40, dtype=torch.bfloat16)[:, 3:V + 3]
    xb.copy_(x)
    xh = xr.half()
    gx_buf = torch.full((n, V + 7), float("nan"))
    gxr_buf = torch.full((n, V + 64), float("nan"), dtype=torch.float16)
    gx, gxr = gx_buf[:, 5:V + 5], gxr_buf[:, :V]
    fwd, outs = run(xb, xh, None, name, param, grad=grad, outs=[gx, gxr])
    check(fwd, outs, want, RTOL)
    assert gx_buf.isnan().sum() == n * 7 and gxr_buf.isnan().sum() == n * 64  # the padding is untouched
    # Either output alone is the same as with both, and labels without masked rows are the same as none.
    only_x = torch.empty(n, V)
    run(xb, xh, torch.zeros(n, dtype=torch.int32), name, param, grad=grad, outs=[only_x, None])
    assert torch.equal(only_x, gx)
    only_xr = torch.empty(n, V, dtype=torch.float16)
    run(xb, xh, None, name, param, grad=grad, outs=[None, only_xr])
    assert torch.equal(only_xr, gxr)
    # Both skipped: nothing to do.
    run(xb, xh, None, name, param, grad=grad, outs=[None, None])
    # A broadcast reference row (row stride 0) reads like its copies.
    fwd_b, outs_b = run(xb, xh[:1].expand(n, V), None, name, param, grad=grad)
    fwd_c, outs_c = run(xb, xh[:1].repeat(n, 1), None, name, param, grad=grad)
    assert all(torch.equal(a, b) for a, b in zip(fwd_b + outs_b, fwd_c + outs_c))
    # In place: each gradient overwrites its logits (the 16-bit input rows are padded, the outputs too).
    x_buf, xr_buf = xb.clone(), torch.zeros(n, V + 64, dtype=torch.float16)[:, :V]
    xr_buf.copy_(xh)
    run(x_buf, xr_buf, None, name, param, grad=grad, outs=[x_buf, xr_buf])
    assert torch.equal(x_buf, gx.bfloat16()) and torch.equal(xr_buf, gxr)
    # Threads split rows, never a row: any thread count gives the same bits.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(xb, xh, None, name, param, grad=grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(single[0] + single[1], fwd + [gx.bfloat16(), gxr]))


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_extreme_logits(name, param):
    n, V = 4, 2500
    x = torch.randn(n, V).clamp(-3, 3)
    xr = torch.randn(n, V).clamp(-3, 3)
    x[0], xr[0] = -50.0, -50.0  # near one-hot, the hot entries apart
    x[0, 7], xr[0, 1900] = 50.0, 50.0
    x[1] *= 50 / 3  # logits spanning +-50
    xr[1] *= 50 / 3
    x[2], xr[2] = -50.0, -50.0  # the same hot entry, different tails
    x[2, 11], xr[2, 11] = 50.0, 50.0
    xr[2, 12] = -40.0
    x[3] = x[3] * 10 + 30  # large common offset
    grad = torch.randn(n)
    for temperature in (1.0, 0.7):
        want = oracle(x, xr, None, name, param, temperature, grad)
        fwd, outs = run(x, xr, None, name, param, temperature, grad)
        # Absolute errors scale with the logits' magnitude (~70 after dividing by 0.7) times fp32 epsilon.
        check(fwd, outs, want, 1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_identical_rows_give_exact_zeros(name, param, dtype):
    x = torch.cat([grid_logits(3, 2600)[0], torch.full((1, 2600), -50.0)]).to(dtype)
    x[3, 5] = 50.0
    fwd, outs = run(x, x.clone(), None, name, param, 0.7, torch.randn(4))
    assert (fwd[0] == 0).all(), fwd[0]
    assert torch.equal(fwd[1], fwd[2])
    assert (outs[0] == 0).all() and (outs[1] == 0).all()


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_minus_inf_logits_take_the_limit(name, param):
    """A -inf logit is probability 0: where both sides have it the element adds nothing, and where one side
    has it alone the terms take their limit (the float64 oracle gets it from a finite -1e4 instead)."""
    n, V = 3, 3000
    x, xr = grid_logits(n, V)
    x[:, :50] = xr[:, :50] = float("-inf")  # a shared vocabulary mask
    x[:, -40:] = float("-inf")  # p = 0 < q: infinite forward KL
    xr[:, 100:130] = float("-inf")  # q = 0 < p: infinite reverse KL
    if name == "reverse_kl":
        xr[:, 100:130] = 0.0
    if name == "forward_kl":
        x[:, -40:] = 0.0
    grad = torch.randn(n)
    want = oracle(x.clamp_min(-1e4), xr.clamp_min(-1e4), None, name, param, 0.7, grad)
    fwd, outs = run(x, xr, None, name, param, 0.7, grad)
    check(fwd, outs, want, 1e-5)
    assert (outs[0][:, :50] == 0).all() and (outs[1][:, :50] == 0).all()
    # And where the divergence is infinite, the kernel says so.
    if name in ("reverse_kl", "forward_kl"):
        x[:, -40:] = xr[:, 100:130] = float("-inf")
        assert (run(x, xr, None, name, param, 0.7, grad)[0][0] == float("inf")).all()


def test_empty_and_invalid():
    x = torch.zeros(0, 5)
    assert all(t.shape == (0,) for t in cpu.div_forward(x, x, None, div_id=0, param=0.0))
    y = torch.randn(3, 5)
    stats = [torch.zeros(3)] * 5
    cpu.div_backward(y, y, None, *stats, None, None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="div_id"):
        cpu.div_forward(y, y, None, div_id=6, param=0.0)
    with pytest.raises(ValueError, match="param"):
        cpu.div_forward(y, y, None, div_id=REGISTRY["js"].kernel_id, param=1.0)
    with pytest.raises(ValueError, match="temperature"):
        cpu.div_forward(y, y, None, div_id=0, param=0.0, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        cpu.div_forward(y, y[:, :4], None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.div_forward(y.t(), y.t(), None, div_id=0, param=0.0)
    with pytest.raises(TypeError, match="float32"):
        cpu.div_forward(y.double(), y, None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="elements"):
        cpu.div_forward(y, y, torch.zeros(2, dtype=torch.int64), div_id=0, param=0.0)
    with pytest.raises(ValueError, match="alias"):  # same memory, another dtype: chunks would overrun
        cpu.div_backward(y, y, None, *stats, y.view(torch.bfloat16)[:, :5], None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="differ"):
        cpu.div_backward(y, y, None, *stats, y, y, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="row_stride"):  # rows of an output may not overlap
        cpu.div_backward(y, y, None, *stats, torch.zeros(5).expand(3, 5), None, div_id=0, param=0.0)
