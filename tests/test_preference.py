"""dpo_loss and bt_loss against independent float64 formulas (written per pair with the math module)."""
import math

import pytest
import torch

import fastpref
from conftest import generator
from fastpref.ops.preference import LOSS_TYPES, RATIO_TYPES, REFERENCE_FREE, SCORE_TYPES
from test_logprobs import close


def lsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(lsig(x))


SCORES = {
    "reverse_kl": lambda r, p: r,
    "forward_kl": lambda r, p: -math.exp(-r),
    "js": lambda r, p: lsig(r),  # beta = 0.5
    "alpha": lambda r, p: math.exp((p - 1) * r) / (p - 1),
}


def oracle(loss_type, w, l, rw_, rl_, lw, ll, beta, eps, divergence="reverse_kl", param=None, gamma=0.5, tau=0.05):
    """Per-pair losses in float64 from the formulas of DESIGN.md / TRL, one pair at a time."""
    B = len(w)
    out = []
    rho_w = [w[i] - rw_[i] for i in range(B)] if rw_ is not None else None
    rho_l = [l[i] - rl_[i] for i in range(B)] if rl_ is not None else None
    if loss_type in ("aot", "aot_unpaired"):
        a = sorted(w[i] - l[i] for i in range(B)) if loss_type == "aot" else sorted(rho_w)
        b = sorted(rw_[i] - rl_[i] for i in range(B)) if loss_type == "aot" else sorted(rho_l)
        return [-(1 - eps) * lsig(beta * (a[i] - b[i])) - eps * lsig(-beta * (a[i] - b[i])) for i in range(B)]
    for i in range(B):
        if loss_type == "simpo":
            z = beta * (w[i] / lw[i] - l[i] / ll[i]) - gamma
            out.append(-(1 - eps) * lsig(z) - eps * lsig(-z))
            continue
        if loss_type == "orpo":
            pw, pl = math.exp(w[i] / lw[i]), math.exp(l[i] / ll[i])
            odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
            out.append(-sum(w) / sum(lw) - beta * lsig(odds))
            continue
        g = lambda r: SCORES[divergence](r, param)  # noqa: E731
        sw, sl = g(rho_w[i]), g(rho_l[i])
        D = sw - sl
        z = beta * D
        out.append({
            "sigmoid": lambda: -(1 - eps) * lsig(z) - eps * lsig(-z),
            "hinge": lambda: max(0.0, 1 - z),
            "ipo": lambda: (sw / lw[i] - sl / ll[i] - 1 / (2 * beta)) ** 2,
            "robust": lambda: (-(1 - eps) * lsig(z) + eps * lsig(-z)) / (1 - 2 * eps),
            "exo_pair": lambda: sig(z) * (lsig(z) - math.log(1 - eps)) + sig(-z) * (lsig(-z) - math.log(eps)),
            "discopop": lambda: -lsig(z) * (1 - sig(z / tau)) + math.exp(-z) * sig(z / tau),
            "sigmoid_norm": lambda: -lsig(beta * (sw / lw[i] - sl / ll[i])),
            "nca_pair": lambda: -lsig(beta * rho_w[i]) - 0.5 * lsig(-beta * rho_w[i]) - 0.5 * lsig(-beta * rho_l[i]),
            "bco_pair": lambda: -lsig(beta * rho_w[i]) - lsig(-beta * rho_l[i]),
            "sppo_hard": lambda: (rho_w[i] - 0.5 / beta) ** 2 + (rho_l[i] + 0.5 / beta) ** 2,
            "apo_zero": lambda: 1 - sig(beta * rho_w[i]) + sig(beta * rho_l[i]),
            "apo_down": lambda: sig(beta * rho_w[i]) + 1 - sig(beta * (rho_w[i] - rho_l[i])),
        }[loss_type]())
    return out


def inputs(B=5, seed=0):
    g = generator(seed)
    lens_w = torch.randint(3, 40, (B,), generator=g)
    lens_l = torch.randint(3, 40, (B,), generator=g)
    w = -lens_w * (0.5 + torch.rand(B, generator=g))
    l = -lens_l * (0.5 + torch.rand(B, generator=g))
    rw = w + torch.randn(B, generator=g) * 3
    rl = l + torch.randn(B, generator=g) * 3
    return w, l, rw, rl, lens_w, lens_l


def fd_grad(fn, xs, h=1e-6):
    """Central finite differences of a float64 scalar function of a list of floats."""
    grads = []
    for i in range(len(xs)):
        up, dn = list(xs), list(xs)
        up[i] += h
        dn[i] -= h
        grads.append((fn(up) - fn(dn)) / (2 * h))
    return torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_loss_types(loss_type, eps):
    if loss_type == "exo_pair" and eps == 0:
        eps = 1e-3
    w, l, rw, rl, lw, ll = inputs()
    ref_free = loss_type in REFERENCE_FREE
    cw, cl = w.clone().requires_grad_(), l.clone().requires_grad_()
    out = fastpref.dpo_loss(cw, cl, None if ref_free else rw, None if ref_free else rl, beta=0.3,
                            loss_type=loss_type, label_smoothing=eps, chosen_lengths=lw, rejected_lengths=ll)
    args = [x.double().tolist() for x in (w, l, rw, rl, lw, ll)]
    B = len(w)
    mean = lambda per: sum(per) / B  # noqa: E731
    expected = mean(oracle(loss_type, *args[:2], *(args[2:4] if not ref_free else [None, None]), *args[4:], 0.3, eps))
    close(out.loss, torch.tensor(expected), 1e-5, f"{loss_type} loss")
    out.loss.backward()
    gw = fd_grad(lambda x: mean(oracle(loss_type, x, args[1], *(args[2:4] if not ref_free else [None, None]),
                                       *args[4:], 0.3, eps)), args[0])
    gl = fd_grad(lambda x: mean(oracle(loss_type, args[0], x, *(args[2:4] if not ref_free else [None, None]),
                                       *args[4:], 0.3, eps)), args[1])
    close(cw.grad, gw, 1e-4, f"{loss_type} grad chosen")
    close(cl.grad, gl, 1e-4, f"{loss_type} grad rejected")
    assert set(out.metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                "logps/chosen", "logps/rejected"}
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("divergence,param", [("forward_kl", None), ("js", 0.5), ("alpha", 0.5), ("alpha", 0.2)])
@pytest.mark.parametrize("loss_type", SCORE_TYPES)
def test_dpo_loss_f_divergences(loss_type, divergence, param):
    w, l, rw, rl, lw, ll = inputs(seed=1)
    # Keep log-ratios moderate so that exp scores stay in range for every divergence.
    rw, rl = w + (rw - w) / 10, l + (rl - l) / 10
    kw = {"alpha": param} if divergence == "alpha" else {}
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    cw = w.clone().requires_grad_()
    out = fastpref.dpo_loss(cw, l, rw, rl, beta=0.5, loss_type=loss_type, divergence=divergence,
                            label_smoothing=eps, chosen_lengths=lw, rejected_lengths=ll, **kw)
    args = [x.double().tolist() for x in (w, l, rw, rl, lw, ll)]
    per = lambda x: oracle(loss_type, x, *args[1:], 0.5, eps, divergence, param)  # noqa: E731
    close(out.loss, torch.tensor(sum(per(args[0])) / 5), 1e-5, "loss")
    out.loss.backward()
    close(cw.grad, fd_grad(lambda x: sum(per(x)) / 5, args[0]), 1e-4, "grad")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_orpo_gradients_when_a_log_prob_is_almost_zero(backend):
    """A sequence's average log-prob in (-6e-8, 0), where fp32 exp() rounds to 1: the loss and both gradients
    are finite and match float64 (the unused form of log(1 - e^x) once turned them into NaN)."""
    cw = torch.tensor([-1e-9, -0.5], requires_grad=True)
    cl = torch.tensor([-2.0, -1e-9], requires_grad=True)
    ones = torch.ones(2)
    out = fastpref.dpo_loss(cw, cl, loss_type="orpo", beta=0.1, chosen_lengths=ones, rejected_lengths=ones,
                            backend=backend)
    got = torch.autograd.grad(out.loss, (cw, cl))
    w, l = cw.detach().double().requires_grad_(), cl.detach().double().requires_grad_()
    log_odds = lambda a: a - torch.log(-torch.expm1(a))  # noqa: E731
    want_loss = -w.sum() / 2 - 0.1 * torch.nn.functional.logsigmoid(log_odds(w) - log_odds(l)).mean()
    want = torch.autograd.grad(want_loss, (w, l))
    close(out.loss, want_loss.detach(), 1e-6, "loss")
    for g, r in zip(got, want):
        assert torch.isfinite(g).all(), g
        close(g, r, 1e-5, "grad")


def test_dpo_loss_reductions_and_rewards():
    w, l, rw, rl, _, _ = inputs()
    out = fastpref.dpo_loss(w, l, rw, rl, beta=0.2, reduction="none")
    assert out.loss.shape == (5,)
    assert torch.allclose(fastpref.dpo_loss(w, l, rw, rl, beta=0.2, reduction="sum").loss, out.loss.sum())
    assert torch.allclose(out.chosen_rewards, 0.2 * (w - rw)) and torch.allclose(out.rejected_rewards, 0.2 * (l - rl))
    assert out.metrics["rewards/accuracies"] == ((w - rw) > (l - rl)).float().mean()


def test_bt_loss():
    rw = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rl = torch.randn(6, dtype=torch.float64)
    margin = torch.rand(6, dtype=torch.float64)
    out = fastpref.bt_loss(rw.float(), rl.float(), margin=margin, center_coef=0.01)
    per = [-lsig(a - b - m) + 0.01 * (a + b) ** 2 for a, b, m in zip(rw.tolist(), rl.tolist(), margin.tolist())]
    close(out.loss, torch.tensor(sum(per) / 6), 1e-6, "bt loss")
    out.loss.backward()
    expected = [(-(1 - sig(a - b - m)) + 0.02 * (a + b)) / 6 for a, b, m in zip(rw.tolist(), rl.tolist(),
                                                                             margin.tolist())]
    close(rw.grad, torch.tensor(expected), 1e-5, "bt grad")
    assert out.metrics["accuracy"] == (rw > rl).float().mean()
    assert fastpref.bt_loss(rw, rl, reduction="none").loss.shape == (6,)


def test_preference_errors():
    w, l, rw, rl, lw, ll = inputs()
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'; valid: sigmoid, hinge"):
        fastpref.dpo_loss(w, l, rw, rl, loss_type="dpo")
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fastpref.dpo_loss(w, l, rw, rl, beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        fastpref.dpo_loss(w, l, rw, rl, label_smoothing=0.5)
    with pytest.raises(ValueError, match="needs ref_chosen_logps and ref_rejected_logps"):
        fastpref.dpo_loss(w, l)
    with pytest.raises(ValueError, match="rejected_logps must match chosen_logps"):
        fastpref.dpo_loss(w, l[:4], rw, rl)
    with pytest.raises(ValueError, match="pass chosen_lengths and rejected_lengths"):
        fastpref.dpo_loss(w, l, rw, rl, loss_type="ipo")
    with pytest.raises(ValueError, match="reference-free"):
        fastpref.dpo_loss(w, l, rw, rl, loss_type="simpo", chosen_lengths=lw, rejected_lengths=ll)
    with pytest.raises(ValueError, match="applies to the score-based loss types"):
        fastpref.dpo_loss(w, l, rw, rl, loss_type="bco_pair", divergence="js")
    with pytest.raises(ValueError, match="has no DPO score"):
        fastpref.dpo_loss(w, l, rw, rl, divergence="tv")
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="center_coef must be a finite number >= 0"):
            fastpref.bt_loss(w, l, center_coef=bad)
    with pytest.raises(ValueError, match="unknown divergence"):
        fastpref.dpo_loss(w, l, rw, rl, divergence="kl")
    with pytest.raises(ValueError, match="needs label_smoothing > 0"):
        fastpref.dpo_loss(w, l, rw, rl, loss_type="exo_pair")
    with pytest.raises(ValueError, match="must be 1-D"):
        fastpref.bt_loss(torch.randn(2, 3), torch.randn(2, 3))
    assert set(RATIO_TYPES) <= set(LOSS_TYPES)


def test_nn_modules_match_functions():
    from fastpref.nn import BTLoss, DPOLoss

    w, l, rw, rl, lw, ll = inputs()
    mod = DPOLoss(beta=0.2, loss_type="ipo")
    assert "loss_type='ipo'" in repr(mod)
    assert torch.equal(mod(w, l, rw, rl, chosen_lengths=lw, rejected_lengths=ll).loss,
                       fastpref.dpo_loss(w, l, rw, rl, beta=0.2, loss_type="ipo", chosen_lengths=lw,
                                         rejected_lengths=ll).loss)
    assert torch.equal(BTLoss(center_coef=0.1)(w, l).loss, fastpref.bt_loss(w, l, center_coef=0.1).loss)
    with pytest.raises(ValueError, match="backend must be one of"):
        BTLoss(backend="gpu")(w, l)
