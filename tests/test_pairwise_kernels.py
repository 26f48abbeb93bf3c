"""The pairwise preference kernel (kernels/triton/pairwise.py) through ``dpo_loss`` / ``bt_loss`` with
backend="triton": values and both gradients against float64 autograd of the loss formulas
(``kernels/reference.py``'s ``pair_forward`` on float64 inputs), and the kernel against its fp32 torch
twin. Without a GPU the kernel runs in the Triton interpreter on CPU tensors."""
import numpy as np
import pytest
import torch

import fastpref
from conftest import generator
from fastpref.divergences import REGISTRY
from fastpref.kernels import reference
from fastpref.ops.preference import LENGTH_NORMALIZED, PAIRWISE_TYPES, REFERENCE_FREE, SCORE_TYPES

pytestmark = pytest.mark.skipif(not fastpref.backends()["triton"].available,
                                reason=fastpref.backends()["triton"].reason)
GPU_TESTS = True  # backend="triton" throughout: CUDA tensors on a GPU (conftest)

# dpo_loss keyword arguments and pair_forward's (div_id, param) per divergence score.
DIVS = {
    "reverse_kl": ({}, 0.0),
    "forward_kl": ({}, 0.0),
    "js": ({"js_beta": 0.3}, 0.3),
    "alpha": ({"alpha": 0.3}, 0.3),
}
DPO_TYPES = [t for t in PAIRWISE_TYPES if t != "bt"]
CASES = [(t, d) for t in SCORE_TYPES for d in DIVS] + [(t, "reverse_kl") for t in DPO_TYPES if t not in SCORE_TYPES]
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo")
FP32_MAX = torch.finfo(torch.float32).max


def make(B, seed, spread=2.0):
    """Sequence log-probs, reference log-probs (log-ratios ~ N(0, spread)) and completion lengths."""
    g = generator(seed)
    nw, nl = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    w = -nw * (0.3 + torch.rand(B, generator=g))
    l = -nl * (0.3 + torch.rand(B, generator=g))
    return w, l, w - spread * torch.randn(B, generator=g), l - spread * torch.randn(B, generator=g), nw, nl


def kernel_args(loss_type, divergence, eps, beta):
    """(dpo_loss keywords, pair_forward keywords) of one configuration."""
    kw, param = DIVS[divergence]
    dpo = dict(beta=beta, loss_type=loss_type, divergence=divergence, label_smoothing=eps, **kw)
    pair = dict(loss_type=loss_type, beta=beta, label_smoothing=eps, div_id=REGISTRY[divergence].kernel_id,
                param=param)
    return dpo, pair


def oracle(w, l, rw, rl, nw, nl, dtype=torch.float64, **pair):
    """float64 per-pair loss and derivatives of the inputs as the kernel sees them (rounded to their dtype);
    with ``dtype=torch.float32`` the same formulas in fp32 (the torch twin)."""
    ref = (None, None) if pair["loss_type"] in REFERENCE_FREE else (rw.to(dtype), rl.to(dtype))
    lengths = (nw.to(dtype), nl.to(dtype)) if pair["loss_type"] in LENGTH_NORMALIZED else (None, None)
    return reference.pair_forward(w.to(dtype), l.to(dtype), *ref, *lengths, **pair)


def check(actual, expected, rtol, what, floor=1e-6, noise=None):
    """Elementwise |actual - expected| <= rtol |expected| + floor max(max|expected|, 1e-6) + 4 noise (+ 1e-30
    for fp32 underflow). The floor covers the float64 oracle's own rounding (autograd through log-sigmoids
    loses ~1e-16 absolute to 1 - sig(x)); ``noise`` (``fp32_noise``) is the error the same formulas have
    in fp32 at this point, which a kernel computing them in fp32 meets too."""
    actual = actual.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite {actual}"
    err = (actual - expected).abs() - rtol * expected.abs()
    atol = floor * max(expected.abs().max().item(), 1e-6) + 1e-30
    if noise is not None:
        atol = atol + 4 * noise
    assert (err <= atol).all(), f"{what}: worst excess {(err - atol).max():.3g}\n{actual}\n{expected}"


def fp32_noise(w, l, rw, rl, nw, nl, **pair):
    """Per pair, the largest |fp32 torch formulas - float64| for (loss, d chosen, d rejected) at the
    inputs and at the policy log-probs one fp32 ulp either side: the formulas' own fp32 error, which the
    relative bound cannot hold where a result is a difference of larger terms (exo_pair's loss near its
    minimum, apo_down's and discopop's gradients, ipo's loss where the margin meets 1 / (2 beta)) and
    which depends on the data, so a bound fitted to one draw fails on another (a GPU's generator draws
    other inputs from the same seeds). Three roundings of the same point, so one lucky exact result
    does not make the noise 0."""
    noise = None
    for step in (None, float("inf"), -float("inf")):
        pw, pl = (w.float(), l.float()) if step is None else (torch.nextafter(w.float(), torch.tensor(step)),
                                                              torch.nextafter(l.float(), torch.tensor(step)))
        twin = oracle(pw, pl, rw, rl, nw, nl, dtype=torch.float32, **pair)
        exact = oracle(pw, pl, rw, rl, nw, nl, **pair)
        err = torch.stack([(a.double() - e).abs() for a, e in zip(twin, exact)])
        noise = err if noise is None else torch.maximum(noise, err)
    return noise


def reduced(per_pair, grads, reduction, upstream):
    """The float64 loss and gradients dpo_loss should give for ``reduction`` (upstream grad for "none")."""
    if reduction == "mean":
        return per_pair.mean(), [g / per_pair.numel() for g in grads]
    if reduction == "sum":
        return per_pair.sum(), grads
    return per_pair, [g * upstream for g in grads]


def run_dpo(w, l, rw, rl, nw, nl, dtype, reduction, dpo, backend="triton"):
    """dpo_loss on ``dtype`` inputs: (loss, grad chosen, grad rejected, output)."""
    cw, cl = w.to(dtype).requires_grad_(), l.to(dtype).requires_grad_()
    ref = (None, None) if dpo["loss_type"] in REFERENCE_FREE else (rw.to(dtype), rl.to(dtype))
    out = fastpref.dpo_loss(cw, cl, *ref, reduction=reduction, chosen_lengths=nw, rejected_lengths=nl,
                            backend=backend, **dpo)
    upstream = torch.linspace(0.5, 1.5, w.shape[0])
    out.loss.backward(upstream if reduction == "none" else None)
    return out.loss.detach(), cw.grad, cl.grad, out, upstream


def check_dpo_kernel(loss_type, divergence, first_seed=0):
    """The kernel through dpo_loss against float64, for every dtype x reduction; B cycles through 1, 7 and
    130 (a partial block each), eps through 0 and 0.1 (1e-3 and 0.1 for exo_pair)."""
    for i, (dtype, reduction) in enumerate((d, r) for d in (torch.float32, torch.bfloat16)
                                           for r in ("mean", "sum", "none")):
        B = (1, 7, 130)[i % 3]
        eps = (0.0, 0.1)[i % 2] if loss_type in SMOOTHED else 0.0
        if loss_type == "exo_pair":
            eps = (1e-3, 0.1)[i % 2]
        dpo, pair = kernel_args(loss_type, divergence, eps, beta=0.4)
        w, l, rw, rl, nw, nl = make(B, seed=first_seed + i)
        w, l, rw, rl = (t.to(dtype) for t in (w, l, rw, rl))
        loss, gw, gl, _, upstream = run_dpo(w, l, rw, rl, nw, nl, dtype, reduction, dpo)
        assert gw.dtype == gl.dtype == dtype and loss.dtype == torch.float32
        per, *grads = oracle(w, l, rw, rl, nw, nl, **pair)
        e_loss, (e_gw, e_gl) = reduced(per, grads, reduction, upstream.double())
        n_per, *n_grads = fp32_noise(w, l, rw, rl, nw, nl, **pair)
        n_loss, (n_gw, n_gl) = reduced(n_per, n_grads, reduction, upstream.double().abs())
        what = f"{dtype} {reduction} B={B} eps={eps} seed={first_seed + i}"
        check(loss, e_loss, 1e-5, f"loss {what}", noise=n_loss)
        # bf16 gradients are rounded to bf16; fp32 ones meet a GPU's exp and FMA contraction (a few ulp).
        grad_rtol = 2e-5 if dtype == torch.float32 else 1e-2
        check(gw, e_gw, grad_rtol, f"grad chosen {what}", noise=n_gw)
        check(gl, e_gl, grad_rtol, f"grad rejected {what}", noise=n_gl)


@pytest.mark.parametrize("loss_type,divergence", CASES)
def test_dpo_kernel_matches_float64(loss_type, divergence):
    check_dpo_kernel(loss_type, divergence)


@pytest.fixture
def gpu_like_math(monkeypatch):
    """The interpreter's tl.exp and fp32 division with a GPU's errors: exp(x) as 2^(x log2 e) with x log2 e
    rounded to fp32 first (ex2.approx), and both results moved by up to 2 ulp at random (ex2.approx and
    div.full's bounds). ``div_rn`` stays exact, as on a GPU."""
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the real thing")
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not all(hasattr(builder, name) for name in ("create_exp", "create_fdiv", "unary_op", "binary_op")):
        pytest.skip("this Triton's interpreter has no create_exp / create_fdiv to patch")
    rng = np.random.default_rng(0)

    def off(y):  # y (float64) rounded to fp32, then up to 2 fp32 ulp away
        ulp = np.abs(np.spacing(y.astype(np.float32))).astype(np.float64)
        return (y + rng.uniform(-2, 2, y.shape) * ulp).astype(np.float32)

    def exp(x):
        t = (x.astype(np.float32) * np.float32(np.log2(np.e))).astype(np.float32)
        return off(np.exp2(t.astype(np.float64))).astype(x.dtype)

    def div(a, b):
        return off(a.astype(np.float64) / b.astype(np.float64)).astype(np.result_type(a, b))

    monkeypatch.setattr(builder, "create_exp", lambda self, arg: self.unary_op(arg, exp))
    monkeypatch.setattr(builder, "create_fdiv", lambda self, lhs, rhs: self.binary_op(lhs, rhs, div))


# Draws (first seeds) that tell: apo_down's gradient (a difference of sigmoid products) broke the bound
# with tl.exp and "/" as on a GPU; exo_pair's loss near its minimum broke the bound before it allowed the
# formulas' fp32 error (the H200's failing case).
GPU_MATH_DRAWS = [("apo_down", "reverse_kl", 1091), ("apo_down", "reverse_kl", 1098), ("apo_down", "reverse_kl", 1133),
                  ("exo_pair", "forward_kl", 1084), ("exo_pair", "forward_kl", 1105)]


@pytest.mark.parametrize("loss_type,divergence,first_seed", GPU_MATH_DRAWS)
def test_dpo_kernel_within_bound_under_gpu_like_exp_and_division(gpu_like_math, loss_type, divergence, first_seed):
    """The kernel's own exp (``_exp``) and correctly rounded divisions keep it within the float64 bound
    when the interpreter computes tl.exp and "/" as a GPU does (with tl.exp and "/" the apo_down draws fail)."""
    check_dpo_kernel(loss_type, divergence, first_seed)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.parametrize("loss_type,divergence", CASES)
def test_dpo_kernel_extreme_log_ratios(loss_type, divergence):
    """Log-ratios up to +-200: finite wherever the float64 results fit in fp32, and equal to them there."""
    grid = torch.tensor([-200.0, -60.0, -3.0, 0.0, 0.5, 60.0, 200.0])
    rho_w, rho_l = grid.repeat(len(grid)), grid.repeat_interleave(len(grid))
    B = rho_w.numel()
    _, _, rw, rl, nw, nl = make(B, seed=3)
    rw, rl = (rw * 4).round() / 4, (rl * 4).round() / 4  # so that logp - ref_logp gives rho exactly in fp32
    w, l = rw + rho_w, rl + rho_l
    if loss_type in REFERENCE_FREE:  # simpo: the log-probs themselves are extreme
        w, l = rho_w - 200.0, rho_l - 200.0
    eps = 1e-3 if loss_type == "exo_pair" else 0.1 if loss_type in SMOOTHED else 0.0
    dpo, pair = kernel_args(loss_type, divergence, eps, beta=1.0)
    _, gw, gl, out, _ = run_dpo(w, l, rw, rl, nw, nl, torch.float32, "none", dpo)
    per, e_gw, e_gl = oracle(w, l, rw, rl, nw, nl, **pair)
    # Compared wherever the float64 results fit in fp32, except where an exponential score (forward_kl,
    # alpha) itself exceeds fp32 (rho < -88 / (1 - alpha)): there the kernel, like the torch path, gives
    # inf or NaN (inf - inf when both scores overflow).
    kw, param = DIVS[divergence]
    scores = REGISTRY[divergence].score(torch.stack([rho_w, rho_l]), param)
    fits = torch.stack([per, e_gw, e_gl]).abs().le(FP32_MAX).all(0) & scores.isfinite().all(0)
    if divergence in ("reverse_kl", "js"):
        assert fits.all()
    assert fits.sum() >= B // 2
    upstream = torch.linspace(0.5, 1.5, B).double()[fits]
    check(out.loss.detach()[fits], per[fits], 1e-5, "loss")
    check(gw[fits], e_gw[fits] * upstream, 1e-5, "grad chosen")
    check(gl[fits], e_gl[fits] * upstream, 1e-5, "grad rejected")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("margin", [None, 0.7, "0-d", "vector"])
def test_bt_kernel_matches_float64(dtype, margin):
    for i, (reduction, center_coef, B) in enumerate((("mean", 0.0, 7), ("sum", 0.01, 130), ("none", 0.05, 1))):
        g = generator(i)
        w, l = (3 * torch.randn(B, generator=g)).to(dtype), (3 * torch.randn(B, generator=g)).to(dtype)
        m = {"0-d": torch.tensor(0.3), "vector": torch.rand(B, generator=g)}.get(margin, margin)
        cw, cl = w.clone().requires_grad_(), l.clone().requires_grad_()
        out = fastpref.bt_loss(cw, cl, margin=m, center_coef=center_coef, reduction=reduction, backend="triton")
        upstream = torch.linspace(0.5, 1.5, B)
        out.loss.backward(upstream if reduction == "none" else None)
        per, *grads = reference.pair_forward(w.double(), l.double(), loss_type="bt", center_coef=center_coef,
                                             margin=m.double() if isinstance(m, torch.Tensor) else m)
        e_loss, (e_gw, e_gl) = reduced(per, grads, reduction, upstream.double())
        check(out.loss.detach(), e_loss, 1e-5, f"bt loss {reduction}")
        grad_rtol = 1e-5 if dtype == torch.float32 else 1e-2
        check(cw.grad, e_gw, grad_rtol, f"bt grad chosen {reduction}")
        check(cl.grad, e_gl, grad_rtol, f"bt grad rejected {reduction}")
        torch_out = fastpref.bt_loss(w, l, margin=m, center_coef=center_coef, reduction=reduction, backend="torch")
        assert torch.equal(out.chosen_rewards, torch_out.chosen_rewards)
        assert out.metrics.keys() == torch_out.metrics.keys()
        assert all(torch.equal(out.metrics[k], torch_out.metrics[k]) for k in out.metrics)


@pytest.mark.parametrize("loss_type,divergence", CASES + [("bt", "reverse_kl")])
def test_torch_twin_equals_kernel(loss_type, divergence):
    from fastpref.kernels.triton import pairwise

    # Two programs, the second partial; log-ratios where the fp32 torch formulas stay finite.
    w, l, rw, rl, nw, nl = make(1030, seed=5, spread=1.0)
    _, pair = kernel_args(loss_type, divergence, 0.1 if loss_type != "exo_pair" else 1e-3, beta=0.4)
    ref = (None, None) if loss_type in REFERENCE_FREE + ("bt",) else (rw, rl)
    lengths = (nw.float(), nl.float()) if loss_type in LENGTH_NORMALIZED else (None, None)
    if loss_type == "bt":
        pair.update(margin=torch.rand(1030), center_coef=0.01)
    for got, want, what in zip(pairwise.pair_forward(w, l, *ref, *lengths, **pair),
                               reference.pair_forward(w, l, *ref, *lengths, **pair), ("loss", "gw", "gl")):
        assert got.dtype == want.dtype == torch.float32
        check(got, want.double(), 1e-4, what, floor=1e-5)  # both fp32: the torch one rounds more


def test_kernel_path_keeps_rewards_and_metrics():
    w, l, rw, rl, nw, nl = make(9, seed=7)
    for loss_type in ("sigmoid", "simpo", "ipo"):
        dpo, _ = kernel_args(loss_type, "reverse_kl", 0.0, beta=0.2)
        *_, fused, _ = run_dpo(w, l, rw, rl, nw, nl, torch.float32, "mean", dpo)
        *_, plain, _ = run_dpo(w, l, rw, rl, nw, nl, torch.float32, "mean", dpo, backend="torch")
        assert torch.equal(fused.chosen_rewards, plain.chosen_rewards)
        assert torch.equal(fused.rejected_rewards, plain.rejected_rewards)
        assert fused.metrics.keys() == plain.metrics.keys()
        assert all(torch.equal(fused.metrics[k], plain.metrics[k]) for k in fused.metrics)
        torch.testing.assert_close(fused.loss, plain.loss)


def test_torch_path_fallbacks():
    w, l, rw, rl, nw, nl = make(6, seed=8)
    # Reference log-probs that require grad: the torch path, gradients reach them.
    rw_, rl_ = rw.clone().requires_grad_(), rl.clone().requires_grad_()
    fastpref.dpo_loss(w, l, rw_, rl_, backend="triton").loss.backward()
    expected = torch.autograd.grad(fastpref.dpo_loss(w, l, rw_, rl_, backend="torch").loss, rw_)[0]
    torch.testing.assert_close(rw_.grad, expected)
    # Batch-coupled types run the torch path on the triton backend too.
    for loss_type, ref in (("aot", (rw, rl)), ("aot_unpaired", (rw, rl)), ("orpo", (None, None))):
        kw = dict(loss_type=loss_type, chosen_lengths=nw, rejected_lengths=nl)
        torch.testing.assert_close(fastpref.dpo_loss(w / 40, l / 40, *ref, backend="triton", **kw).loss,
                                   fastpref.dpo_loss(w / 40, l / 40, *ref, backend="torch", **kw).loss)
    # A margin that requires grad gets its gradient.
    margin = torch.rand(6, requires_grad=True)
    fastpref.bt_loss(w, l, margin=margin, backend="triton").loss.backward()
    assert margin.grad is not None and margin.grad.abs().sum() > 0


def test_kernel_path_errors():
    from fastpref.kernels.triton import pairwise

    w, l, rw, rl, _, _ = make(4, seed=9)
    cw = w.clone().requires_grad_()
    loss = fastpref.dpo_loss(cw, l, rw, rl, backend="triton").loss
    (g,) = torch.autograd.grad(loss, cw, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        g.sum().backward()
    for impl in (pairwise, reference):
        with pytest.raises(ValueError, match="has no pairwise kernel"):
            impl.pair_forward(w, l, rw, rl, loss_type="orpo")
    with pytest.raises(ValueError, match="not valid for loss_type"):
        pairwise.pair_forward(w, l, rw, rl, loss_type="bco_pair", div_id=REGISTRY["js"].kernel_id, param=0.5)
    with pytest.raises(ValueError, match="margin is bt's option"):
        pairwise.pair_forward(w, l, rw, rl, loss_type="sigmoid", margin=0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpref.dpo_loss(w, l, rw, rl, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpref.bt_loss(w, l, backend="gpu")
