"""token_divergence, linear_token_divergence and kl_estimate against float64 formulas."""
import math

import pytest
import torch

import fastpref
from conftest import backend_params
from oracle import divergence_f64
from test_logprobs import TOL, LargestAllocation, close, make_labels

BACKENDS = backend_params("torch", "cpu", "triton")
DIVS = [("reverse_kl", None), ("forward_kl", None), ("js", 0.5), ("js", 0.2), ("alpha", 0.5), ("alpha", 0.8),
        ("tv", None), ("hellinger", None)]


def _params(name, param):
    return {} if param is None else {"beta" if name == "js" else "alpha": param}


def check_div(backend, x, xr, name, param, *, labels=None, temperature=1.0, ref_grad=True, floor=1e-12,
              grad_rtol=None):
    a = x.detach().requires_grad_()
    b = xr.detach().requires_grad_(ref_grad)
    ra, rb = x.detach().double().requires_grad_(), xr.detach().double().requires_grad_(ref_grad)
    out = fastpref.token_divergence(a, b, divergence=name, labels=labels, temperature=temperature,
                                    backend=backend, **_params(name, param))
    ref = divergence_f64(ra, rb, name, param, temperature=temperature, labels=labels)
    assert out.dtype == torch.float32 and out.shape == x.shape[:-1]
    close(out, ref, 2e-5, f"{name} value", floor)
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    close(a.grad, ra.grad, grad_rtol or TOL[x.dtype], f"{name} grad logits", floor)
    if ref_grad:
        close(b.grad, rb.grad, grad_rtol or TOL[xr.dtype], f"{name} grad ref_logits", floor)
    else:
        assert b.grad is None
    if labels is not None:
        masked = labels == -100
        assert (out[masked] == 0).all() and (a.grad[masked] == 0).all()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,param", DIVS)
def test_divergences_fp32(backend, name, param):
    V = 1000
    labels = make_labels((2, 4), V)
    check_div(backend, torch.randn(2, 4, V) * 2, torch.randn(2, 4, V) * 2, name, param, labels=labels,
              temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,param", [("reverse_kl", None), ("js", 0.5), ("alpha", 0.3), ("hellinger", None)])
def test_divergences_bf16_large_vocab(backend, name, param):
    V = 70001
    check_div(backend, (torch.randn(2, V) * 2).bfloat16(), (torch.randn(2, V) * 2).bfloat16(), name, param,
              ref_grad=name != "js")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,param", DIVS)
def test_divergences_extreme_and_identical(backend, name, param):
    V = 257
    x = (torch.rand(3, V) * 2 - 1) * 50  # logits in [-50, 50]: near one-hot rows
    xr = (torch.rand(3, V) * 2 - 1) * 50
    xr[2] = x[2]
    # Divergences of ~50 nats: the gradient p_k (a_k - sum_v p_v a_v) cancels to ~1e-3 of the terms, so
    # fp32 leaves ~1e-4 of it (absolute, against a floor of 1).
    out = check_div(backend, x, xr, name, param, floor=1.0, grad_rtol=2e-4)
    # Identical inputs: exactly zero divergence and zero gradient.
    same = torch.randn(2, V, requires_grad=True)
    d = fastpref.token_divergence(same, same.detach(), divergence=name, backend=backend, **_params(name, param))
    d.sum().backward()
    assert d.abs().max() < 1e-6 and same.grad.abs().max() < 1e-6
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_identities(backend):
    V = 500
    x, xr = torch.randn(8, V) * 3, torch.randn(8, V) * 3
    div = lambda name, **p: fastpref.token_divergence(x, xr, divergence=name, backend=backend, **p)  # noqa: E731
    rkl, fkl = div("reverse_kl"), div("forward_kl")
    # alpha -> 1 approaches reverse KL, alpha -> 0 forward KL (TRL's convention).
    assert torch.allclose(div("alpha", alpha=1 - 1e-4), rkl, rtol=2e-3, atol=1e-4)
    assert torch.allclose(div("alpha", alpha=1e-4), fkl, rtol=2e-3, atol=1e-4)
    assert (div("js") <= math.log(2) + 1e-6).all() and (div("js") >= 0).all()
    assert (div("tv") <= 1 + 1e-6).all() and (div("tv") >= 0).all()
    assert (rkl >= 0).all() and (fkl >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,param", [("reverse_kl", None), ("forward_kl", None), ("js", 0.5), ("tv", None)])
def test_linear_token_divergence(backend, name, param):
    B, T, H, Hr, V = 2, 3, 16, 12, 1001
    hidden, ref_hidden = torch.randn(B, T, H), torch.randn(B, T, Hr)
    weight, ref_weight = torch.randn(V, H) * 0.3, torch.randn(V, Hr) * 0.3
    bias, ref_bias = torch.randn(V) * 0.1, torch.randn(V) * 0.1
    labels = make_labels((B, T), V)
    ins = [t.clone().requires_grad_() for t in (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)]
    refs = [t.double().requires_grad_() for t in (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)]
    out = fastpref.linear_token_divergence(ins[0], ins[1], ins[3], ins[4], bias=ins[2], ref_bias=ins[5],
                                           divergence=name, labels=labels, temperature=0.9, chunk_size=2,
                                           backend=backend, **_params(name, param))
    ref = divergence_f64(refs[0] @ refs[1].T + refs[2], refs[3] @ refs[4].T + refs[5], name, param,
                         temperature=0.9, labels=labels)
    close(out, ref, 2e-5, "value")
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    for n, a, r in zip(("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"), ins, refs):
        close(a.grad, r.grad, 5e-5, f"grad {n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_divergence_frozen_reference(backend):
    """The usual RLHF case: gradients to the policy only; the reference head does no gradient work."""
    H, V = 8, 300
    h = torch.randn(5, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    hr, wr = torch.randn(5, H), torch.randn(V, H)
    out = fastpref.linear_token_divergence(h, w, hr, wr, backend=backend)
    out.sum().backward()
    rh, rw = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    divergence_f64(rh @ rw.T, (hr @ wr.T).double(), "reverse_kl").sum().backward()
    close(h.grad, rh.grad, 5e-5, "grad hidden")
    close(w.grad, rw.grad, 5e-5, "grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_divergence_weight_grads_need_no_fp32_copy(backend):
    """16-bit heads' gradients are written slice by slice in their dtype: nothing [V, H]-sized in fp32."""
    N, H, V, chunk = 24, 64, 3001, 4
    h, hr = (torch.randn(N, H, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w, wr = ((torch.randn(V, H) * 0.2).to(torch.bfloat16).requires_grad_() for _ in range(2))
    labels = make_labels((N,), V)
    out = fastpref.linear_token_divergence(h, w, hr, wr, labels=labels, chunk_size=chunk, backend=backend)
    with LargestAllocation() as mode:
        out.sum().backward()
    assert mode.largest <= max(chunk * V * 4, V * H * 2), f"a tensor of {mode.largest} bytes was allocated"
    assert w.grad.dtype == wr.grad.dtype == torch.bfloat16


def test_divergence_errors():
    x, xr = torch.randn(2, 10), torch.randn(2, 10)
    with pytest.raises(ValueError, match="unknown divergence 'kl'; valid: reverse_kl, forward_kl, js, alpha, tv"):
        fastpref.token_divergence(x, xr, divergence="kl")
    with pytest.raises(ValueError, match=r"alpha must be in the open interval \(0, 1\)"):
        fastpref.token_divergence(x, xr, divergence="alpha", alpha=1.0)
    with pytest.raises(ValueError, match=r"beta must be in the open interval \(0, 1\)"):
        fastpref.token_divergence(x, xr, divergence="js", beta=0.0)
    with pytest.raises(TypeError, match="unexpected parameter"):
        fastpref.token_divergence(x, xr, divergence="tv", beta=0.5)
    # js_beta, the name the losses document, is js's beta everywhere; the caller's name is the one reported.
    assert torch.equal(fastpref.token_divergence(x, xr, divergence="js", js_beta=0.3),
                       fastpref.token_divergence(x, xr, divergence="js", beta=0.3))
    with pytest.raises(TypeError, match=r"unexpected parameter\(s\) \['js_beta'\]; its parameter is 'alpha'"):
        fastpref.token_divergence(x, xr, divergence="alpha", js_beta=0.3)
    with pytest.raises(TypeError, match="got both 'js_beta' and 'beta'"):
        fastpref.token_divergence(x, xr, divergence="js", js_beta=0.3, beta=0.3)
    with pytest.raises(ValueError, match="ref_logits must have the shape of logits"):
        fastpref.token_divergence(x, xr[:, :9])
    with pytest.raises(ValueError, match="ref_logits is on meta but logits is on cpu"):
        fastpref.token_divergence(x, xr.to("meta"))
    with pytest.raises(TypeError, match="ref_logits must be float32"):
        fastpref.token_divergence(x, xr.long())
    with pytest.raises(ValueError, match="both heads must share the vocabulary"):
        fastpref.linear_token_divergence(torch.randn(2, 4), torch.randn(10, 4), torch.randn(2, 4), torch.randn(9, 4))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+"])
def test_kl_estimate(estimator):
    logp = (torch.randn(4, 6) - 1).requires_grad_()
    ref = (torch.randn(4, 6) - 1).requires_grad_()
    rd, refd = logp.detach().double(), ref.detach().double()
    r = refd - rd
    k = {"k1": -r, "k2": r**2 / 2, "k3": torch.exp(r) - 1 - r}
    rc = r.clamp(-20, 20)
    k["low_var_kl"] = (torch.exp(rc) - 1 - rc).clamp(-10, 10)
    out = fastpref.kl_estimate(logp, ref, estimator=estimator)
    close(out, k[estimator.rstrip("+")], 1e-6, "value")
    out.sum().backward()
    if estimator.endswith("+") or estimator == "k2":
        expected = -r  # d(r^2/2)/dlogp
    elif estimator == "k1":
        expected = torch.ones_like(r)
    else:
        expected = -(torch.exp(r) - 1)
        if estimator == "low_var_kl":  # the clamps cut the gradient where they bind
            expected = torch.where(k["k3"] > 10, 0.0, expected)
    close(logp.grad, expected, 1e-6, "grad logp")
    close(ref.grad, -expected, 1e-6, "grad ref_logp")


def test_kl_estimate_low_var_clamps_and_errors():
    logp, ref = torch.tensor([0.0, 0.0]), torch.tensor([30.0, -30.0])
    out = fastpref.kl_estimate(logp, ref, estimator="low_var_kl")
    assert out[0] == 10.0 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown estimator 'k4'; valid: k1, k2, k3, low_var_kl"):
        fastpref.kl_estimate(logp, ref, estimator="k4")
    with pytest.raises(ValueError, match="ref_logp must have the shape of logp"):
        fastpref.kl_estimate(logp, ref[:1])
