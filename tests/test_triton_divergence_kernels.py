"""The Triton divergence row kernels (fastpref/kernels/triton/divergence.py) against float64 formulas and
against ``kernels/reference.py``; on CPU they run in the interpreter (TRITON_INTERPRET=1, see conftest.py).

Logits lie on a 1/32 grid inside (-8, 8), on which bf16 and fp32 hold them exactly: both dtypes then describe the
same distributions, and log p - log q takes few distinct values per row, so no element sits so close to p = q
that rounding could flip total variation's sign (its gradient is discontinuous there).
"""
import pytest
import torch

pytest.importorskip("triton")

from fastpref._backends import triton_interpreting  # noqa: E402
from fastpref.divergences import REGISTRY  # noqa: E402
from fastpref.kernels import reference  # noqa: E402

if not (torch.cuda.is_available() or triton_interpreting()):
    pytest.skip("no CUDA device and TRITON_INTERPRET is unset", allow_module_level=True)

from fastpref.kernels.triton import divergence  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Non-default parameters, so a kernel that ignored them would fail.
DIVS = [("reverse_kl", 0.0), ("forward_kl", 0.0), ("js", 0.3), ("alpha", 0.7), ("tv", 0.0), ("hellinger", 0.0)]
DIV_IDS = [name for name, _ in DIVS]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the outputs' dtype
# The per-row sums cancel (s_a, s_b near 0 for close p and q; value - lse differences): fp32 epsilon times
# the terms' magnitudes (|lse| ~ 12 here) bounds their error absolutely, as it does the fp32 reference's.
ATOL = 2e-6


def grid_logits(n, V, scale=2.0):
    top = 255 / 32
    x = ((torch.randn(n, V) * scale * 32).round() / 32).clamp(-top, top)
    xr = (x + (torch.randn(n, V) * 0.5 * 32).round() / 32).clamp(-top, top)
    assert torch.equal(x, x.bfloat16().float()) and torch.equal(xr, xr.bfloat16().float())
    return x, xr


def oracle(x, xr, labels, name, param, temperature, grad, ignore_index=-100):
    """(value, lse, lse_r, s_a, s_b, grad_x, grad_xr) in float64 from the registry's terms."""
    lp = torch.log_softmax(x.double() / temperature, -1)
    lq = torch.log_softmax(xr.double() / temperature, -1)
    qf, pa, qb = REGISTRY[name].terms(lp, lq, param)
    s_a, s_b = pa.sum(-1), qb.sum(-1)
    g = grad.double()[:, None] / temperature
    outs = [qf.sum(-1), torch.logsumexp(x.double() / temperature, -1), torch.logsumexp(xr.double() / temperature, -1),
            s_a, s_b, g * (pa - lp.exp() * s_a[:, None]), g * (qb - lq.exp() * s_b[:, None])]
    keep = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    return [torch.where(keep.view(-1, *[1] * (o.dim() - 1)), o, 0.0) for o in outs]


def close(actual, expected, rtol, what, atol=0.0):
    """Relative error in norm (robust to the odd tiny element), with ``atol`` for values that are ~0."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).norm()
    assert err <= rtol * expected.norm() + atol, f"{what}: error {err:.3g} vs norm {expected.norm():.3g}"


def run(x, xr, labels, name, param, temperature=1.0, grad=None, out_dtypes=(None, None), ignore_index=-100):
    div_id = REGISTRY[name].kernel_id
    fwd = divergence.div_forward(x, xr, labels, div_id=div_id, param=param, temperature=temperature,
                                 ignore_index=ignore_index)
    outs = [None if dt is False else torch.full(x.shape, float("nan"), dtype=dt or t.dtype, device=DEVICE)
            for dt, t in zip(out_dtypes, (x, xr))]
    divergence.div_backward(x, xr, labels, *fwd[1:], grad, *outs, div_id=div_id, param=param,
                            temperature=temperature, ignore_index=ignore_index)
    return list(fwd), outs


def labels_for(n, V, ignore_index=-100):
    labels = torch.randint(0, V, (n,))
    labels[::3] = ignore_index
    return labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", [7, 1000, 70001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_matches_float64_and_reference(name, param, dtype, V, temperature):
    n = 2 if V > 2048 else 7
    x, xr = grid_logits(n, V)
    labels = labels_for(n, V)
    grad = torch.randn(n)
    want = oracle(x, xr, labels, name, param, temperature, grad)
    x, xr = x.to(dtype).to(DEVICE), xr.to(dtype).to(DEVICE)
    fwd, (gx, gxr) = run(x, xr, labels.to(DEVICE), name, param, temperature, grad.to(DEVICE))
    # The inputs are exact in either dtype and the kernels compute in fp32: fp32 accuracy for both, except
    # the gradients rounded to the inputs' dtype.
    for what, got, exp in zip(("value", "lse", "lse_r", "s_a", "s_b"), fwd, want):
        assert got.dtype == torch.float32 and got.shape == (n,)
        close(got, exp, 1e-5, what, atol=ATOL)
    assert gx.dtype == gxr.dtype == dtype
    close(gx, want[5], RTOL[dtype], "grad_x")
    close(gxr, want[6], RTOL[dtype], "grad_xr")
    # And within fp32 rounding of the fp32 reference backend.
    div_id = REGISTRY[name].kernel_id
    ref = reference.div_forward(x, xr, labels.to(DEVICE), div_id=div_id, param=param, temperature=temperature)
    for what, got, exp in zip(("value", "lse", "lse_r", "s_a", "s_b"), fwd, ref):
        close(got, exp, 1e-5, f"{what} vs reference", atol=1e-6)
    ref_gx, ref_gxr = torch.empty_like(gx), torch.empty_like(gxr)
    reference.div_backward(x, xr, labels.to(DEVICE), *ref[1:], grad.to(DEVICE), ref_gx, ref_gxr, div_id=div_id,
                           param=param, temperature=temperature)
    close(gx, ref_gx, RTOL[dtype], "grad_x vs reference")
    close(gxr, ref_gxr, RTOL[dtype], "grad_xr vs reference")


@pytest.mark.parametrize("name,param", DIVS + [("js", 0.5), ("alpha", 0.5)],
                         ids=DIV_IDS + ["js-0.5", "alpha-0.5"])
def test_masked_rows_are_zero_and_never_read(name, param):
    n, V = 6, 3000
    x, xr = grid_logits(n, V)
    labels = labels_for(n, V, ignore_index=-1)
    grad = torch.randn(n)
    want = oracle(x, xr, labels, name, param, 0.7, grad, ignore_index=-1)
    x[labels == -1] = float("nan")
    xr[labels == -1] = float("nan")
    fwd, (gx, gxr) = run(x.to(DEVICE), xr.to(DEVICE), labels.to(DEVICE), name, param, 0.7, grad.to(DEVICE),
                         ignore_index=-1)
    for what, got, exp in zip(("value", "lse", "lse_r", "s_a", "s_b"), fwd, want):
        close(got, exp, 1e-5, what, atol=ATOL)
        assert (got[labels == -1] == 0).all(), what
    close(gx, want[5], 1e-5, "grad_x")
    close(gxr, want[6], 1e-5, "grad_xr")
    assert (gx[labels == -1] == 0).all() and (gxr[labels == -1] == 0).all()
    # Whatever the caller leaves in a masked row's per-row inputs is not used either.
    masked = (labels == -1).to(DEVICE)
    lse, lse_r, s_a, s_b = (torch.where(masked, float("nan"), t) for t in fwd[1:])
    out = torch.full_like(gx, float("nan"))
    divergence.div_backward(x.to(DEVICE), xr.to(DEVICE), labels.to(DEVICE), lse, lse_r, s_a, s_b,
                            torch.where(masked, float("nan"), grad.to(DEVICE)), out, None,
                            div_id=REGISTRY[name].kernel_id, param=param, temperature=0.7, ignore_index=-1)
    assert torch.equal(out, gx)


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_layouts_dtypes_and_optional_arguments(name, param):
    n, V = 4, 1500
    x, xr = grid_logits(n, V)
    grad = torch.randn(n)
    want = oracle(x, xr, None, name, param, 1.0, grad)
    # Different row strides, mixed input dtypes, outputs in other dtypes, no labels.
    wide = torch.zeros(n, V + 40, dtype=torch.bfloat16)
    wide[:, 3:V + 3] = x.to(torch.bfloat16)
    xb = wide[:, 3:V + 3]
    xf = xr.to(torch.float16).to(DEVICE)
    fwd, (gx, gxr) = run(xb.to(DEVICE), xf, None, name, param, grad=grad.to(DEVICE),
                         out_dtypes=(torch.float32, torch.float16))
    for what, got, exp in zip(("value", "lse", "lse_r", "s_a", "s_b"), fwd, want):
        close(got, exp, 1e-5, what, atol=ATOL)
    close(gx, want[5], 1e-5, "grad_x fp32 from bf16 logits")
    close(gxr, want[6], RTOL[torch.float16], "grad_xr fp16 from fp16 logits")
    # Either output alone is the same as with both.
    _, (only_x, absent) = run(xb.to(DEVICE), xf, None, name, param, grad=grad.to(DEVICE),
                              out_dtypes=(torch.float32, False))
    assert absent is None and torch.equal(only_x, gx)
    _, (absent, only_xr) = run(xb.to(DEVICE), xf, None, name, param, grad=grad.to(DEVICE),
                               out_dtypes=(False, torch.float16))
    assert absent is None and torch.equal(only_xr, gxr)
    # In place: each gradient overwrites its logits.
    x_buf, xr_buf = x.clone().to(DEVICE), xr.clone().to(DEVICE)
    expect = run(x_buf, xr_buf, None, name, param, grad=grad.to(DEVICE))[1]
    divergence.div_backward(x_buf, xr_buf, None, *fwd[1:], grad.to(DEVICE), x_buf, xr_buf,
                            div_id=REGISTRY[name].kernel_id, param=param)
    fwd32 = divergence.div_forward(x.to(DEVICE), xr.to(DEVICE), None, div_id=REGISTRY[name].kernel_id, param=param)
    for a, b in zip(fwd32, fwd):
        close(a, b, 1e-6, "16-bit and fp32 copies of the same logits", atol=1e-7)
    close(x_buf, expect[0], 1e-6, "in-place grad_x")
    close(xr_buf, expect[1], 1e-6, "in-place grad_xr")


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
        fwd, (gx, gxr) = run(x.to(DEVICE), xr.to(DEVICE), None, name, param, temperature, grad.to(DEVICE))
        # Absolute errors scale with the logits' magnitude (~70 after dividing by 0.7) times fp32 epsilon.
        for what, got, exp in zip(("value", "lse", "lse_r", "s_a", "s_b"), fwd, want):
            close(got, exp, 1e-5, what, atol=2e-5)
        close(gx, want[5], 1e-5, "grad_x", atol=2e-5)
        close(gxr, want[6], 1e-5, "grad_xr", atol=2e-5)


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_identical_rows_give_zero(name, param):
    x = torch.cat([grid_logits(3, 1300)[0], torch.full((1, 1300), -50.0)])
    x[3, 5] = 50.0
    fwd, (gx, gxr) = run(x.to(DEVICE), x.clone().to(DEVICE), None, name, param, 0.7, torch.randn(4).to(DEVICE))
    assert (fwd[0] == 0).all(), fwd[0]
    assert torch.equal(fwd[1], fwd[2])
    assert (gx == 0).all() and (gxr == 0).all()


def test_empty_and_invalid():
    x = torch.zeros(0, 5, device=DEVICE)
    assert all(t.shape == (0,) for t in divergence.div_forward(x, x, None, div_id=0, param=0.0))
    y = torch.randn(3, 5, device=DEVICE)
    divergence.div_backward(y, y, None, *[torch.zeros(3, device=DEVICE)] * 5, None, None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="kernel id"):
        divergence.div_forward(y, y, None, div_id=6, param=0.0)
    with pytest.raises(ValueError, match="shape"):
        divergence.div_forward(y, y[:, :4], None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        divergence.div_forward(y.t(), y.t(), None, div_id=0, param=0.0)
    with pytest.raises(TypeError, match="float32"):
        divergence.div_forward(y.double(), y, None, div_id=0, param=0.0)


def test_launch_configs_cover_the_launchers():
    configs = divergence.launch_configs()
    keys = {(fn.__name__, tuple(sorted(c.items())), w) for fn, _, c, w in configs}
    assert len(keys) == 6 * 2 * 2 + 6 * 2 * 2 * 3  # DIV x labels x table rows (x 3 output flags backward)
    for V in (7, 1024, 1025, 70001):
        block_v, num_warps = divergence._config(V)
        assert ("_div_fwd_kernel", (("BLOCK_V", block_v), ("DIV", 3), ("HAS_LABELS", False)), num_warps) in keys
