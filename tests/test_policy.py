"""ppo_loss, value_loss, generator_penalty against float64 formulas written out here, sequence by sequence."""
import math

import pytest
import torch

import fastpref
from conftest import generator
from fastpref.nn import PPOLoss, ValueLoss


def _kl(lp, ref, name):
    r = ref - lp
    if name.startswith("k1"):
        return -r
    if name == "k2":
        return r * r / 2
    if name.startswith("low_var_kl"):
        return (torch.exp(r.clamp(-20, 20)) - 1 - r.clamp(-20, 20)).clamp(-10, 10)
    return torch.exp(r) - 1 - r


def ppo_f64(lp, old, adv, mask, *, clip_low=0.2, clip_high=None, dual_clip=None, importance="token", ref=None,
            kl=None, kl_coef=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0, loss_agg="token-mean",
            num_items=None):
    """The loss written token by token in float64 (lp differentiable)."""
    B, T = lp.shape
    hi = clip_low if clip_high is None else clip_high
    adv = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
    total, tokens = 0.0, int(mask.sum())
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        seq_sum = 0.0
        if importance == "sequence" and idx:
            s = sum(float(lp[b, t].detach() - old[b, t]) for t in idx) / len(idx)
        for t in idx:
            a = float(adv[b, t])
            if importance == "sequence":
                c = math.exp(min(s, 10.0)) * torch.exp(lp[b, t] - lp[b, t].detach())
            else:
                c = torch.exp(lp[b, t] - old[b, t])
            l = torch.maximum(-a * c, -a * c.clamp(1 - clip_low, 1 + hi))
            if dual_clip is not None and a < 0:
                l = torch.minimum(l, torch.tensor(-a * dual_clip, dtype=torch.float64))
            if ref is not None:
                v = _kl(lp[b, t], ref[b, t], kl_estimator)
                if kl_estimator.endswith("+"):
                    k2 = (ref[b, t] - lp[b, t]) ** 2 / 2
                    v = k2 + (v - k2).detach()
                l = l + kl_coef * v
            if kl is not None:
                l = l + kl_coef * kl[b, t]
            if entropy is not None:
                l = l - entropy_coef * entropy[b, t]
            seq_sum = seq_sum + l
        if loss_agg == "token-mean":
            total = total + seq_sum / (num_items or max(tokens, 1))
        elif loss_agg == "seq-mean-token-mean":
            total = total + seq_sum / max(len(idx), 1) / (num_items or B)
        elif loss_agg == "seq-mean-token-sum":
            total = total + seq_sum / (num_items or B)
        else:
            total = total + seq_sum / ((num_items or B) * T)
    return total if torch.is_tensor(total) else torch.tensor(total, dtype=torch.float64)


def make(B=4, T=9, seed=0, adv_2d=False):
    g = generator(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios spread across both clips
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn((B, T) if adv_2d else (B,), generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return lp, old, adv, mask, ref, ent


CASES = [
    dict(),
    dict(clip_low=0.2, clip_high=0.28),
    dict(dual_clip=3.0),
    dict(ref=True, kl_coef=0.1, kl_estimator="k3"),
    dict(ref=True, kl_coef=0.1, kl_estimator="k1"),
    dict(ref=True, kl_coef=0.1, kl_estimator="k2"),
    dict(ref=True, kl_coef=0.1, kl_estimator="low_var_kl"),
    dict(ref=True, kl_coef=0.1, kl_estimator="k3+"),
    dict(ent=True, entropy_coef=0.01),
    dict(loss_agg="seq-mean-token-mean"),
    dict(loss_agg="seq-mean-token-sum"),
    dict(loss_agg="seq-mean-token-sum-norm"),
    dict(loss_agg="token-mean", num_items=50),
    dict(importance="sequence", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean"),
    dict(importance="sequence", clip_low=0.2, loss_agg="seq-mean-token-mean"),
]


@pytest.mark.parametrize("adv_2d", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_ppo_loss_matches_formula(case, adv_2d):
    lp, old, adv, mask, ref, ent = make(adv_2d=adv_2d)
    kw = dict(case)
    use_ref, use_ent = kw.pop("ref", False), kw.pop("ent", False)
    a = lp.clone().float().requires_grad_()
    out = fastpref.ppo_loss(a, old.float(), adv.float(), mask, ref_logp=ref.float() if use_ref else None,
                            entropy=ent.float() if use_ent else None, **kw)
    out.loss.backward()
    b = lp.clone().requires_grad_()
    want = ppo_f64(b, old, adv, mask, ref=ref if use_ref else None, entropy=ent if use_ent else None, **kw)
    want.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(a.grad).all()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)
    assert (a.grad[~mask] == 0).all()


def test_metrics_match_definitions():
    lp, old, adv, mask, ref, ent = make()
    out = fastpref.ppo_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0, ref_logp=ref, entropy=ent)
    m = out.metrics
    ratio = torch.exp(lp - old)[mask]
    a = adv[:, None].expand_as(lp)[mask]
    low = ((ratio < 0.8) & (a < 0)).double().mean()
    high = ((ratio > 1.28) & (a > 0)).double().mean()
    torch.testing.assert_close(m["clip_ratio/low"].double(), low)
    torch.testing.assert_close(m["clip_ratio/high"].double(), high)
    torch.testing.assert_close(m["clip_ratio/region"].double(), low + high)
    torch.testing.assert_close(m["ratio/mean"].double(), ratio.mean())
    torch.testing.assert_close(m["ratio/max"].double(), ratio.max())
    torch.testing.assert_close(m["entropy"].double(), ent[mask].mean())
    torch.testing.assert_close(m["kl"].double(), _kl(lp, ref, "k3")[mask].mean())
    assert 0 < float(low) and 0 < float(high)  # the data reaches both clips, so the test means something


def test_on_policy_old_logp_none_is_ratio_one():
    lp, _, adv, mask, _, _ = make()
    a = lp.clone().requires_grad_()
    out = fastpref.ppo_loss(a, None, adv, mask)
    out.loss.backward()
    b = lp.clone().requires_grad_()
    ppo_f64(b, lp.detach(), adv, mask).backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert float(out.metrics["ratio/mean"]) == 1.0


@pytest.mark.parametrize("loss_agg", fastpref.ops.policy.LOSS_AGGS)
def test_all_masked_sequence_contributes_nothing(loss_agg):
    lp, old, adv, mask, _, ent = make()
    mask[2] = False
    lp[2], old[2] = float("nan"), float("-inf")  # padding garbage must not leak
    a = lp.clone().requires_grad_()
    out = fastpref.ppo_loss(a, old, adv, mask, entropy=ent, loss_agg=loss_agg)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(a.grad).all() and (a.grad[2] == 0).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    keep = [0, 1, 3]
    b = lp.clone()
    b[2] = 0.0
    b.requires_grad_()
    old2 = old.clone()
    old2[2] = 0.0
    want = ppo_f64(b, old2, adv, mask, loss_agg=loss_agg)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert fastpref.ppo_loss(lp[keep], old[keep], adv[keep], mask[keep], loss_agg=loss_agg).loss.isfinite()


def test_everything_masked_gives_zero_not_nan():
    lp, old, adv, mask, _, _ = make()
    a = lp.clone().requires_grad_()
    out = fastpref.ppo_loss(a, old, adv, torch.zeros_like(mask))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and (a.grad == 0).all()


@pytest.mark.parametrize("loss_agg", fastpref.ops.policy.LOSS_AGGS)
def test_num_items_makes_micro_batches_equal_one_batch(loss_agg):
    lp, old, adv, mask, _, _ = make(B=8, T=6)
    counts = {"token-mean": int(mask.sum())}
    num_items = counts.get(loss_agg, 8)
    a = lp.clone().requires_grad_()
    full = fastpref.ppo_loss(a, old, adv, mask, loss_agg=loss_agg, num_items=num_items)
    full.loss.backward()
    if loss_agg == "token-mean":  # num_items = the global token count is exactly the plain token mean
        torch.testing.assert_close(full.loss, fastpref.ppo_loss(lp, old, adv, mask, loss_agg=loss_agg).loss)
    for parts in (1, 4):
        b = lp.clone().requires_grad_()
        total = 0.0
        for idx in torch.arange(8).chunk(parts):
            part = fastpref.ppo_loss(b[idx], old[idx], adv[idx], mask[idx], loss_agg=loss_agg, num_items=num_items)
            part.loss.backward()
            total += float(part.loss.detach())
        torch.testing.assert_close(b.grad, a.grad)
        assert math.isclose(total, float(full.loss.detach()), rel_tol=1e-6)


def test_precomputed_kl_is_a_penalty_with_gradient():
    lp, old, adv, mask, ref, _ = make()
    a = lp.clone().requires_grad_()
    kl = fastpref.generator_penalty(a, ref, divergence="js")
    out = fastpref.ppo_loss(a, old, adv, mask, kl=kl, kl_coef=0.5)
    out.loss.backward()
    b = lp.clone().requires_grad_()
    u = torch.exp(b - ref)
    js = 0.5 * u * torch.log(u) - (0.5 * u + 0.5) * torch.log(0.5 * u + 0.5)  # f'(1) = 0 for js
    ppo_f64(b, old, adv, mask, kl=js, kl_coef=0.5).backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(out.metrics["kl"].double(), js[mask].mean().detach())


@pytest.mark.parametrize("name,param", [("forward_kl", None), ("js", 0.3), ("alpha", 0.4), ("reverse_kl", None)])
def test_generator_penalty(name, param):
    lp, _, _, _, ref, _ = make()
    params = {"js": {"js_beta": param}, "alpha": {"alpha": param}}.get(name, {})
    a = lp.clone().requires_grad_()
    got = fastpref.generator_penalty(a, ref, divergence=name, **params)
    u = torch.exp(lp - ref)
    if name == "forward_kl":
        want = u - 1 - torch.log(u)  # DPH-RL's form
    elif name == "reverse_kl":
        want = u * torch.log(u) - (u - 1)
    elif name == "js":
        want = param * u * torch.log(u) - (param * u + 1 - param) * torch.log(param * u + 1 - param)
    else:
        want = (u**param - param * u - (1 - param)) / (param * (param - 1))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()  # f(u) - f'(1)(u - 1) >= 0 for a convex f
    got.sum().backward()
    assert torch.isfinite(a.grad).all()
    # The clamp keeps a far-off token finite.
    far = fastpref.generator_penalty(torch.tensor([0.0]), torch.tensor([-500.0]), divergence=name, **params)
    assert torch.isfinite(far).all()


def test_value_loss():
    g = generator(1)
    v, old, ret = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 5, generator=g) > 0.3
    a = v.clone().requires_grad_()
    out = fastpref.value_loss(a, old, ret, mask, clip=0.2)
    out.loss.backward()
    b = v.clone().requires_grad_()
    total = 0.0
    for i, j in mask.nonzero().tolist():
        clipped = old[i, j] + (b[i, j] - old[i, j]).clamp(-0.2, 0.2)
        total = total + 0.5 * torch.maximum((b[i, j] - ret[i, j]) ** 2, (clipped - ret[i, j]) ** 2)
    (total / mask.sum()).backward()
    torch.testing.assert_close(out.loss.double(), total / mask.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert 0 < float(out.metrics["vf_clipfrac"]) < 1
    unclipped = fastpref.value_loss(v, old, ret, mask, clip=None).loss
    torch.testing.assert_close(unclipped.double(), 0.5 * ((v - ret) ** 2)[mask].mean())
    assert torch.equal(ValueLoss(clip=0.2)(v, old, ret, mask).loss, out.loss.detach())


def test_module():
    lp, old, adv, mask, ref, _ = make()
    mod = PPOLoss(clip_high=0.28, kl_coef=0.1, loss_agg="seq-mean-token-mean")
    got = mod(lp, old, adv, mask, ref_logp=ref)
    want = fastpref.ppo_loss(lp, old, adv, mask, clip_high=0.28, kl_coef=0.1, ref_logp=ref,
                             loss_agg="seq-mean-token-mean")
    assert torch.equal(got.loss, want.loss) and "kl_coef=0.1" in repr(mod)


def test_errors():
    lp, old, adv, mask, ref, _ = make()
    with pytest.raises(ValueError, match=r"mask must have the shape of logp \(4, 9\)"):
        fastpref.ppo_loss(lp, old, adv, mask[:, :5])
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \(4,\) or \[B, T\]"):
        fastpref.ppo_loss(lp, old, adv[:3], mask)
    with pytest.raises(ValueError, match=r"old_logp must have shape \(4, 9\)"):
        fastpref.ppo_loss(lp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="clip_low must be a finite number > 0"):
        fastpref.ppo_loss(lp, old, adv, mask, clip_low=0.0)
    with pytest.raises(ValueError, match="clip_high must be a finite number > 0"):
        fastpref.ppo_loss(lp, old, adv, mask, clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip must be a finite number > 1"):
        fastpref.ppo_loss(lp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="unknown loss_agg 'seq-mean'; valid: token-mean"):
        fastpref.ppo_loss(lp, old, adv, mask, loss_agg="seq-mean")
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'; valid: k1"):
        fastpref.ppo_loss(lp, old, adv, mask, ref_logp=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        fastpref.ppo_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the per-token entropy"):
        fastpref.ppo_loss(lp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="either ref_logp .* or kl"):
        fastpref.ppo_loss(lp, old, adv, mask, ref_logp=ref, kl=ref)
    with pytest.raises(ValueError, match="unknown importance 'seq'"):
        fastpref.ppo_loss(lp, old, adv, mask, importance="seq")
    with pytest.raises(ValueError, match="num_items must be a finite number > 0"):
        fastpref.ppo_loss(lp, old, adv, mask, num_items=0)
    with pytest.raises(TypeError, match="logp must be a floating-point"):
        fastpref.ppo_loss(mask, old, adv, mask)
    with pytest.raises(ValueError, match=r"returns must have shape \(4, 9\)"):
        fastpref.value_loss(lp, old, ref[:2], mask)
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        fastpref.value_loss(lp, old, ref, mask, clip=0)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        fastpref.generator_penalty(lp, ref, divergence="kl")
