"""The divergence row kernels of every native backend (contract: the bottom of ``fastpref/kernels/reference.py``)
against float64 formulas (log_softmax of the float64 logits and the registry's terms) and against the fp32
reference backend: ``fastpref/kernels/cpu.py`` over ``csrc/divergence_cpu.cpp``, and
``fastpref/kernels/triton/divergence.py``, which on CPU runs in the interpreter (TRITON_INTERPRET=1, see
conftest.py). Each test runs for both unless marked for one backend.

Most logits lie on a 1/32 grid inside (-8, 8), which fp32, bf16 and fp16 all hold exactly: every dtype then
describes the same distributions, and log p - log q takes few distinct values per row, so no element sits so
close to p = q that rounding could flip total variation's sign (its gradient is discontinuous there).
"""
import importlib

import pytest
import torch

from conftest import backend_params
from fastpref.divergences import REGISTRY
from fastpref.kernels import reference

MODULES = {"cpu": "fastpref.kernels.cpu", "triton": "fastpref.kernels.triton.divergence", "cuda": "fastpref.kernels.cuda"}
# The torch backend's row functions (the fp32 reference below) join the kernels where a test names it.
ALL_MODULES = dict(MODULES, torch="fastpref.kernels.reference")
# Non-default parameters, so a kernel that ignored them would fail.
DIVS = [("reverse_kl", 0.0), ("forward_kl", 0.0), ("js", 0.3), ("alpha", 0.7), ("tv", 0.0), ("hellinger", 0.0)]
DIV_IDS = [name for name, _ in DIVS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the gradients' dtype
# The per-row sums cancel (s_a, s_b near 0 for close p and q) and every log-probability is z - lse with an
# fp32 lse: fp32 epsilon times |lse| (~12 here) bounds their error absolutely.
ATOL = 2e-6
STATS = ("value", "lse", "lse_r", "s_a", "s_b")
EXPLICIT_DEVICES = True  # each backend's device is kern.device (conftest)


class Backend:
    def __init__(self, name, module, device):
        self.name, self.module, self.device = name, module, device

    def __getattr__(self, attr):
        return getattr(self.module, attr)

    def __repr__(self):
        return self.name


@pytest.fixture(params=backend_params(*MODULES))
def kern(request):
    """The backend's module (div_forward, div_backward, ...), with ``name`` and the ``device`` it runs on."""
    name = request.param
    module = importlib.import_module(ALL_MODULES[name])
    device = torch.device("cuda" if name in ("triton", "cuda") and torch.cuda.is_available() else "cpu")
    return Backend(name, module, device)


def only(*names):
    """Runs a test for these backends alone (overriding the ``kern`` fixture's params)."""
    return pytest.mark.parametrize("kern", backend_params(*names), indirect=True)


def per_backend(argnames, values, where):
    """Parametrizes ``kern`` (each backend) jointly with ``argnames``, over the ``values`` that
    ``where(backend, *value)`` keeps for it."""
    params = []
    for backend in backend_params(*MODULES):
        for value in values:
            value = value if isinstance(value, tuple) else (value,)
            if where(backend.id, *value):
                ids = [backend.id, *(str(v).removeprefix("torch.") for v in value)]
                params.append(pytest.param(backend.values[0], *value, marks=backend.marks, id="-".join(ids)))
    return pytest.mark.parametrize(f"kern,{argnames}", params, indirect=["kern"])


def grid_logits(n, V, scale=2.0):
    top = 255 / 32
    x = ((torch.randn(n, V) * scale * 32).round() / 32).clamp(-top, top)
    xr = (x + (torch.randn(n, V) * 0.5 * 32).round() / 32).clamp(-top, top)
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(x, x.to(dt).float()) and torch.equal(xr, xr.to(dt).float())
    return x, xr


def oracle(x, xr, labels, name, param, temperature, grad, ignore_index=-100):
    """(value, lse, lse_r, s_a, s_b, grad_x, grad_xr) in float64, on the CPU."""
    z, zr = x.double().cpu() / temperature, xr.double().cpu() / temperature
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    qf, pa, qb = REGISTRY[name].terms(lp, lq, param)
    s_a, s_b = pa.sum(-1), qb.sum(-1)
    g = grad.double().cpu()[:, None] / temperature
    outs = [qf.sum(-1), torch.logsumexp(z, -1), torch.logsumexp(zr, -1), s_a, s_b,
            g * (pa - lp.exp() * s_a[:, None]), g * (qb - lq.exp() * s_b[:, None])]
    keep = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels.cpu() != ignore_index
    return [torch.where(keep.view(-1, *[1] * (o.dim() - 1)), o, 0.0) for o in outs]


def same(kern, a, b, what):
    """The same results through two code paths of one kernel: bit for bit on the CPU (and in the Triton
    interpreter); on a GPU the compiler contracts each specialization's arithmetic into FMAs its own way, and a
    16-bit output can then round to the neighbouring value. fp32 is held there to the float64 oracle's 1e-5:
    the two-pass divergences' gradients cancel, and the Triton kernel's grad_x alone and with grad_xr were
    2.1e-6 apart in norm for alpha on an H200."""
    if kern.device.type == "cpu":
        assert torch.equal(a, b), what
    else:
        close(a, b, 1e-5 if a.dtype == torch.float32 else RTOL[a.dtype], what, atol=1e-12)


def close(actual, expected, rtol, what, atol=0.0):
    """Relative error in norm (robust to the odd tiny element), with ``atol`` for values that are ~0."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).norm()
    assert err <= rtol * expected.norm() + atol, f"{what}: error {err:.3g} vs norm {expected.norm():.3g}"


def run(kern, x, xr, labels, name, param, temperature=1.0, grad=None, outs=None, ignore_index=-100, fwd=None):
    """Forward (unless its results ``fwd`` are given), then backward into ``outs`` (default: NaN-filled tensors
    of the inputs' dtypes)."""
    div_id = REGISTRY[name].kernel_id
    if fwd is None:
        fwd = kern.div_forward(x, xr, labels, div_id=div_id, param=param, temperature=temperature,
                               ignore_index=ignore_index)
    if outs is None:
        outs = [torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device) for t in (x, xr)]
    kern.div_backward(x, xr, labels, *fwd[1:], grad, *outs, div_id=div_id, param=param, temperature=temperature,
                      ignore_index=ignore_index)
    return list(fwd), outs


def labels_for(n, V, ignore_index=-100):
    labels = torch.randint(0, V, (n,))
    labels[::3] = ignore_index
    return labels


def check(fwd, outs, want, grad_rtol, atol=ATOL, grad_atol=0.0):
    """The forward's statistics within fp32 accuracy (``atol`` for the sums that cancel), the gradients within
    ``grad_rtol`` (a float, or one per output dtype) in norm."""
    for what, got, exp in zip(STATS, fwd, want):
        assert got.dtype == torch.float32 and got.shape == exp.shape, what
        close(got, exp, 1e-5, what, atol=atol)
    for what, got, exp in zip(("grad_x", "grad_xr"), outs, want[5:]):
        if got is not None:
            rtol = grad_rtol[got.dtype] if isinstance(grad_rtol, dict) else grad_rtol
            close(got, exp, rtol, what, atol=grad_atol)


# V = 1 (p = q = 1) for the CPU kernel alone: the GPU kernels recompute log p in the backward through exp2
# and lse * log2(e) (Triton), or with FMAs the CPU build does not contract, which round away from 0 when
# T != 1, so their gradients are rounding noise rather than exact zeros, and total variation's, a step in
# sign(p - q), are then O(grad) wrong. fp16 for the C++ kernels alone, to keep the interpreter's time down:
# fp16 logits and gradients reach the Triton kernel in test_layouts_... below. V = 4096 is two whole blocks of
# the GPU kernels (no partial last block), 1000 one partial block, 70001 both.
@per_backend("dtype,V", [(dt, V) for dt in DTYPES for V in (1, 7, 1000, 4096, 70001)],
             where=lambda backend, dtype, V: backend == "cpu" or (V > 1 and (backend == "cuda" or
                                                                              dtype != torch.float16)))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_matches_float64_and_reference(kern, name, param, dtype, V, temperature):
    n = 2 if V > 2048 else 7
    x, xr = grid_logits(n, V)
    labels = labels_for(n, V)
    grad = torch.randn(n)
    want = oracle(x, xr, labels, name, param, temperature, grad)
    x, xr = x.to(kern.device, dtype), xr.to(kern.device, dtype)
    labels, grad = labels.to(kern.device), grad.to(kern.device)
    fwd, outs = run(kern, x, xr, labels, name, param, temperature, grad)
    # The inputs are exact in every dtype and the kernels compute in fp32: fp32 accuracy throughout, except
    # the gradients rounded to the inputs' dtype.
    assert outs[0].dtype == outs[1].dtype == dtype
    # fp16 gradients under 2^-14 are subnormal, spaced 2^-24 apart: over a 70001-wide vocabulary their
    # rounding adds up to ~ATOL in norm.
    check(fwd, outs, want, RTOL, grad_atol=ATOL if dtype == torch.float16 else 0.0)
    if V == 1:  # p = q = 1
        assert (fwd[0] == 0).all() and (outs[0] == 0).all() and (outs[1] == 0).all()
    # And within fp32 rounding of the fp32 reference backend.
    div_id = REGISTRY[name].kernel_id
    ref = reference.div_forward(x, xr, labels, div_id=div_id, param=param, temperature=temperature)
    for what, got, exp in zip(STATS, fwd, ref):
        close(got, exp, 1e-5, f"{what} vs reference", atol=1e-6)
    ref_outs = [torch.empty_like(t) for t in outs]
    reference.div_backward(x, xr, labels, *ref[1:], grad, *ref_outs, div_id=div_id, param=param,
                           temperature=temperature)
    for what, got, exp in zip(("grad_x", "grad_xr"), outs, ref_outs):
        close(got, exp, RTOL[dtype], f"{what} vs reference")


@pytest.mark.parametrize("name,param", DIVS + [("js", 0.5), ("alpha", 0.5)], ids=DIV_IDS + ["js-0.5", "alpha-0.5"])
def test_masked_rows_are_zero_and_never_read(kern, name, param):
    n, V = 6, 3000
    x, xr = grid_logits(n, V)
    labels = labels_for(n, V, ignore_index=-1)
    grad = torch.randn(n)
    want = oracle(x, xr, labels, name, param, 0.7, grad, ignore_index=-1)
    masked = labels == -1
    x[masked] = float("nan")
    xr[masked] = float("nan")
    x, xr, labels, grad, masked = (t.to(kern.device) for t in (x, xr, labels, grad, masked))
    fwd, outs = run(kern, x, xr, labels, name, param, 0.7, grad, ignore_index=-1)
    check(fwd, outs, want, 1e-5)
    assert all((t[masked] == 0).all() for t in fwd + outs)
    # Whatever the caller leaves in a masked row's per-row inputs is not used either.
    stats = [torch.where(masked, float("nan"), t) for t in fwd[1:] + [grad]]
    out = torch.full_like(outs[0], float("nan"))
    kern.div_backward(x, xr, labels, *stats, out, None, div_id=REGISTRY[name].kernel_id, param=param,
                      temperature=0.7, ignore_index=-1)
    assert torch.equal(out, outs[0])


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_layouts_dtypes_and_optional_arguments(kern, name, param):
    # Each backend's own sizes: the Triton interpreter's time grows with the rows.
    (n, V), dev = (5, 2500) if kern.name == "cpu" else (4, 1500), kern.device
    x, xr = grid_logits(n, V)
    grad = torch.randn(n, device=dev)
    want = oracle(x, xr, None, name, param, 1.0, grad)
    # Padded rows with different strides, mixed input dtypes, outputs in other dtypes and padded, no labels.
    xb = torch.zeros(n, V + 40, dtype=torch.bfloat16, device=dev)[:, 3:V + 3]
    xb.copy_(x)
    xh = xr.half().to(dev)
    gx_buf = torch.full((n, V + 7), float("nan"), device=dev)
    gxr_buf = torch.full((n, V + 64), float("nan"), dtype=torch.float16, device=dev)
    gx, gxr = gx_buf[:, 5:V + 5], gxr_buf[:, :V]
    fwd, outs = run(kern, xb, xh, None, name, param, grad=grad, outs=[gx, gxr])
    check(fwd, outs, want, RTOL)
    assert gx_buf.isnan().sum() == n * 7 and gxr_buf.isnan().sum() == n * 64  # the padding is untouched
    # The same logits in fp32 give the same statistics, up to fp32 rounding. On a GPU the padded 16-bit rows
    # take the scalar path and the fp32 ones the vector path, which sum in other orders (and contract other
    # FMAs): the two-pass divergences' sums (js, alpha, hellinger) then differ by more than 1e-6 on an H200,
    # so there each is held to the float64 oracle's bound, which check() above met for both.
    rtol, atol = (1e-6, 1e-7) if dev.type == "cpu" else (2e-5, 2 * ATOL)
    fwd32 = kern.div_forward(x.to(dev), xr.to(dev), None, div_id=REGISTRY[name].kernel_id, param=param)
    for what, a, b in zip(STATS, fwd32, fwd):
        close(a, b, rtol, f"{what}: 16-bit and fp32 copies of the same logits", atol=atol)
    # Either output alone is the same as with both, and labels without masked rows are the same as none.
    # (Runs that pass ``fwd`` only need the backward: the Triton interpreter is slow.)
    only_x = torch.empty(n, V, device=dev)
    fwd_l = run(kern, xb, xh, torch.zeros(n, dtype=torch.int32, device=dev), name, param, grad=grad,
                outs=[only_x, None])[0]
    same(kern, only_x, gx, "grad_x alone")
    for what, a, b in zip(STATS, fwd_l, fwd):
        same(kern, a, b, f"{what} with labels")
    only_xr = torch.empty(n, V, dtype=torch.float16, device=dev)
    run(kern, xb, xh, None, name, param, grad=grad, outs=[None, only_xr], fwd=fwd)
    same(kern, only_xr, gxr, "grad_xr alone")
    # Both skipped: nothing to do.
    run(kern, xb, xh, None, name, param, grad=grad, outs=[None, None], fwd=fwd)
    # A broadcast reference row (row stride 0) reads like its copies. The Triton kernels address rows alike
    # for every divergence: one of the single-pass (KL) forwards and one of the two-pass ones cover them.
    if kern.name == "cpu" or name in ("reverse_kl", "js"):
        fwd_b, outs_b = run(kern, xb, xh[:1].expand(n, V), None, name, param, grad=grad)
        fwd_c, outs_c = run(kern, xb, xh[:1].repeat(n, 1), None, name, param, grad=grad)
        for a, b in zip(fwd_b + outs_b, fwd_c + outs_c):
            same(kern, a, b, "broadcast reference row")
    # In place: each gradient overwrites its logits (the 16-bit input rows are padded, the outputs too) ...
    x_buf, xr_buf = xb.clone(), torch.zeros(n, V + 64, dtype=torch.float16, device=dev)[:, :V]
    xr_buf.copy_(xh)
    run(kern, x_buf, xr_buf, None, name, param, grad=grad, outs=[x_buf, xr_buf], fwd=fwd)
    outs16 = run(kern, xb, xh, None, name, param, grad=grad, fwd=fwd)[1]  # the same outputs, written elsewhere
    same(kern, x_buf, outs16[0], "in-place grad_x")
    same(kern, xr_buf, gxr, "in-place grad_xr")
    if kern.name == "cpu":  # bf16 outputs are the fp32 ones rounded to nearest (the Triton interpreter truncates)
        assert torch.equal(outs16[0], gx.bfloat16())
    # ... and fp32 logits, with the statistics of their 16-bit copies.
    x_buf, xr_buf = x.to(dev), xr.to(dev)
    expect = run(kern, x_buf, xr_buf, None, name, param, grad=grad, fwd=fwd32)[1]
    run(kern, x_buf, xr_buf, None, name, param, grad=grad, outs=[x_buf, xr_buf], fwd=fwd)
    close(x_buf, expect[0], 1e-6, "in-place grad_x")
    close(xr_buf, expect[1], 1e-6, "in-place grad_xr")
    if kern.name == "cpu":
        # Threads split rows, never a row: any thread count gives the same bits.
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = run(kern, xb, xh, None, name, param, grad=grad)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(single[0] + single[1], fwd + [gx.bfloat16(), gxr]))


@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_extreme_logits(kern, name, param):
    n, V = 5, 2500
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
    x[4, :5] = -8000.0  # p underflows to 0 where q does not: forward KL's log-ratio ~ 8000 there, not a limit
    grad = torch.randn(n)
    for temperature in (1.0, 0.7):
        want = oracle(x, xr, None, name, param, temperature, grad)
        fwd, outs = run(kern, x.to(kern.device), xr.to(kern.device), None, name, param, temperature,
                        grad.to(kern.device))
        # Absolute errors scale with the logits' magnitude (~70 after dividing by 0.7) times fp32 epsilon.
        check(fwd, outs, want, 1e-5, atol=2e-5, grad_atol=2e-5)


# 16-bit logits for the C++ kernel alone, to keep the interpreter's time down.
@per_backend("dtype", DTYPES, where=lambda backend, dtype: backend in ("cpu", "cuda") or dtype == torch.float32)
@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_identical_rows_give_exact_zeros(kern, name, param, dtype):
    V = 2600 if kern.name == "cpu" else 1300  # each backend's own size
    x = torch.cat([grid_logits(3, V)[0], torch.full((1, V), -50.0)]).to(kern.device, dtype)
    x[3, 5] = 50.0
    fwd, outs = run(kern, x, x.clone(), None, name, param, 0.7, torch.randn(4, device=kern.device))
    assert torch.equal(fwd[1], fwd[2])
    if kern.device.type == "cpu":
        assert (fwd[0] == 0).all(), fwd[0]
        assert (outs[0] == 0).all() and (outs[1] == 0).all()
    else:  # a GPU's FMAs and exp2 leave fp32 rounding noise (see test_matches_float64_and_reference)
        for what, t in zip(("value", "grad_x", "grad_xr"), (fwd[0], *outs)):
            close(t, torch.zeros_like(t), 0.0, what, atol=ATOL)


@only("torch", "cpu", "triton", "cuda")
@pytest.mark.parametrize("name,param", DIVS, ids=DIV_IDS)
def test_minus_inf_logits_take_the_limit(kern, name, param):
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
    fwd, outs = run(kern, x, xr, None, name, param, 0.7, grad)
    check(fwd, outs, want, 1e-5)
    assert (outs[0][:, :50] == 0).all() and (outs[1][:, :50] == 0).all()
    # And where the divergence is infinite, the kernel says so (the torch backend: with a number past 1e30,
    # its products of -inf log-probabilities being taken at the lowest finite float).
    if name in ("reverse_kl", "forward_kl"):
        x[:, -40:] = xr[:, 100:130] = float("-inf")
        value = run(kern, x, xr, None, name, param, 0.7, grad)[0][0]
        assert (value > 1e30).all() if kern.name == "torch" else (value == float("inf")).all(), value


def test_empty_and_invalid(kern):
    x = torch.zeros(0, 5, device=kern.device)
    assert all(t.shape == (0,) for t in kern.div_forward(x, x, None, div_id=0, param=0.0))
    y = torch.randn(3, 5, device=kern.device)
    stats = [torch.zeros(3, device=kern.device)] * 5
    kern.div_backward(y, y, None, *stats, None, None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="kernel id"):
        kern.div_forward(y, y, None, div_id=6, param=0.0)
    with pytest.raises(ValueError, match="shape"):
        kern.div_forward(y, y[:, :4], None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        kern.div_forward(y.t(), y.t(), None, div_id=0, param=0.0)
    with pytest.raises(TypeError, match="float32"):
        kern.div_forward(y.double(), y, None, div_id=0, param=0.0)


# Checks the C++ kernels need for memory safety; the Triton launchers leave them to the callers (the ops).
@only("cpu")
def test_invalid_arguments_the_native_kernels_reject(kern):
    y = torch.randn(3, 5)
    stats = [torch.zeros(3)] * 5
    with pytest.raises(ValueError, match="div_id"):
        kern.div_forward(y, y, None, div_id=6, param=0.0)
    with pytest.raises(ValueError, match="param"):
        kern.div_forward(y, y, None, div_id=REGISTRY["js"].kernel_id, param=1.0)
    with pytest.raises(ValueError, match="temperature"):
        kern.div_forward(y, y, None, div_id=0, param=0.0, temperature=0.0)
    with pytest.raises(ValueError, match="elements"):
        kern.div_forward(y, y, torch.zeros(2, dtype=torch.int64), div_id=0, param=0.0)
    with pytest.raises(ValueError, match="alias"):  # same memory, another dtype: chunks would overrun
        kern.div_backward(y, y, None, *stats, y.view(torch.bfloat16)[:, :5], None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="differ"):
        kern.div_backward(y, y, None, *stats, y, y, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="row_stride"):  # rows of an output may not overlap
        kern.div_backward(y, y, None, *stats, torch.zeros(5).expand(3, 5), None, div_id=0, param=0.0)


@only("triton")
def test_launch_configs_cover_the_launchers(kern):
    configs = kern.launch_configs()
    keys = {(fn.__name__, tuple(sorted(c.items())), w) for fn, _, c, w in configs}
    assert len(keys) == 6 * 2 * 2 + 6 * 2 * 2 * 3  # DIV x labels x table rows (x 3 output flags backward)
    for V in (7, 1024, 1025, 70001):
        block_v, num_warps = kern._config(V)
        assert ("_div_fwd_kernel", (("BLOCK_V", block_v), ("DIV", 3), ("HAS_LABELS", False)), num_warps) in keys
