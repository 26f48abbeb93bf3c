"""linear_ppo_loss: fused == unfused (float64 logits -> log-probs, entropy -> ppo_loss), the 3-matmul path,
eval mode, errors."""
import pytest
import torch

import fastpref
from conftest import CountMatmuls, backend_params, generator
from oracle import divergence_f64, logprobs_f64
from test_logprobs import LargestAllocation, close

B, T, H, V = 3, 7, 8, 211


def make(seed=0, dtype=torch.float32):
    g = generator(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt
    mask = labels != -100
    mask[1, 5:] = False  # padding, label left in place
    lp, _ = logprobs_f64(hidden.double() @ weight.double().T + bias.double(), labels)
    old = (lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).float()  # both clips reached
    adv = torch.randn(B, generator=g)
    ref_hidden = hidden + 0.3 * torch.randn(B, T, H, generator=g).to(dtype)
    return hidden, weight, bias, labels, mask, old, adv, ref_hidden


CASES = [
    dict(),
    dict(clip_high=0.28, dual_clip=3.0, loss_agg="seq-mean-token-mean"),
    dict(entropy_coef=0.01, loss_agg="seq-mean-token-sum-norm", temperature=0.7),
    dict(ref="logp", kl_coef=0.1, kl_estimator="k3"),
    dict(ref="model", kl_coef=0.1, kl_estimator="low_var_kl+"),
    dict(ref="model", divergence="js", js_beta=0.3, kl_coef=0.2, loss_agg="seq-mean-token-sum"),
    dict(importance="sequence", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean"),
    dict(old=None, softcap=3.0, num_items=20),
]


def unfused(hidden, weight, bias, labels, mask, old, adv, ref_hidden, case):
    kw = dict(case)
    ref, temperature, softcap = kw.pop("ref", None), kw.pop("temperature", 1.0), kw.pop("softcap", None)
    divergence, js_beta = kw.pop("divergence", None), kw.pop("js_beta", 0.5)
    kw.pop("old", None)
    logits = hidden.double() @ weight.double().T + bias.double()
    y = labels.masked_fill(~mask, -100)
    lp, ent = logprobs_f64(logits, y, temperature=temperature, softcap=softcap)
    ref_logits = ref_hidden.double() @ weight.detach().double().T + bias.detach().double()  # a frozen reference
    if divergence is not None:
        kw["kl"] = divergence_f64(logits, ref_logits, divergence, js_beta, temperature=temperature, labels=y)
    elif ref is not None:
        kw["ref_logp"], _ = logprobs_f64(ref_logits, y, temperature=temperature)
    return fastpref.ppo_loss(lp, old, adv, mask, entropy=ent, **kw).loss


def fused(hidden, weight, bias, labels, mask, old, adv, ref_hidden, case, **extra):
    kw = dict(case)
    ref = kw.pop("ref", None)
    if ref == "logp":
        y = labels.masked_fill(~mask, -100)
        kw["ref_logp"] = fastpref.linear_logprobs(ref_hidden, weight, y, bias=bias).detach()
    elif ref == "model":
        kw.update(ref_hidden=ref_hidden, ref_weight=weight.detach(), ref_bias=bias.detach())
    return fastpref.linear_ppo_loss(hidden, weight, labels, kw.pop("old", old), adv, mask, bias=bias, **kw, **extra)


@pytest.mark.parametrize("backend", backend_params("torch", "cpu", "triton"))
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fused_equals_unfused(backend, chunk_size, case):
    hidden, weight, bias, labels, mask, old, adv, ref_hidden = make()
    if case.get("old", 1) is None:
        old = None
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused(*leaves, labels, mask, old, adv, ref_hidden, case, chunk_size=chunk_size, backend=backend)
    out.loss.backward()
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    want = unfused(*ref_leaves, labels, mask, old, adv, ref_hidden.double(), case)
    want.backward()
    close(out.loss, want, 1e-5, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        close(a.grad, b.grad, 1e-5, f"grad {name}")
    assert (leaves[0].grad[~mask] == 0).all()
    lp, _ = logprobs_f64(hidden.double() @ weight.double().T + bias.double(), labels.masked_fill(~mask, -100),
                         temperature=case.get("temperature", 1.0), softcap=case.get("softcap"))
    close(out.metrics["logp"], lp, 1e-5, "logp")
    assert "entropy" in out.metrics and torch.isfinite(out.metrics["entropy"])


@pytest.mark.parametrize("backend", backend_params("torch", "cpu"))
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_bf16(backend, chunk_size):
    """One chunk (auto) writes the weight gradient in bf16 directly, several sum it in fp32 first."""
    hidden, weight, bias, labels, mask, old, adv, ref_hidden = make(dtype=torch.bfloat16)
    case = dict(clip_high=0.28, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with LargestAllocation() as mode:
        out = fused(*leaves, labels, mask, old, adv, ref_hidden, case, chunk_size=chunk_size, backend=backend)
        out.loss.backward()
    assert (((V, H), torch.float32) in mode.seen) == (chunk_size is not None)
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    unfused(*ref_leaves, labels, mask, old, adv, ref_hidden.double(), case).backward()
    for name, a, b in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert a.grad.dtype == torch.bfloat16
        close(a.grad.float(), b.grad, 2e-2, f"grad {name}")


def test_all_masked_sequence_and_strided_hidden():
    hidden, weight, bias, labels, mask, old, adv, _ = make()
    mask[2] = False
    old[2] = float("nan")
    wide = torch.randn(B, T + 1, H)
    wide[:, :-1] = hidden
    strided = wide[:, :-1].requires_grad_(False).clone().requires_grad_()
    view = wide.clone().requires_grad_()
    out = fastpref.linear_ppo_loss(view[:, :-1], weight, labels, old, adv, mask, bias=bias,
                                   loss_agg="seq-mean-token-mean")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(view.grad).all() and (view.grad[2] == 0).all()
    want = fastpref.linear_ppo_loss(strided, weight, labels, old, adv, mask, bias=bias, loss_agg="seq-mean-token-mean")
    want.loss.backward()
    close(out.loss, want.loss, 1e-6, "strided")
    close(view.grad[:, :-1], strided.grad, 1e-6, "strided grad")


def _matmuls(chunk_size, grad=True, **case):
    hidden, weight, _, labels, mask, old, adv, _ = make()
    hidden.requires_grad_()
    weight.requires_grad_()
    with CountMatmuls() as mode, torch.set_grad_enabled(grad):
        out = fastpref.linear_ppo_loss(hidden, weight, labels, old, adv, mask, chunk_size=chunk_size,
                                       backend="torch", **case)
        if grad:
            out.loss.backward()
    return mode.count, out


def test_bf16_head_takes_one_chunk_when_cheaper_than_the_fp32_accumulator(monkeypatch):
    """With a chunk budget of 4 rows, the 13 kept tokens take one chunk for a bf16 head (its fp32 [V, H]
    accumulator would cost the bf16 logits of 2 H = 16 rows) and 4 chunks for an fp32 head."""
    monkeypatch.setattr(fastpref.ops.logprobs, "auto_chunk_size", lambda n, V, hidden: min(n, 4))
    for dtype, calls in ((torch.bfloat16, 3), (torch.float32, 3 * 4)):
        hidden, weight, _, labels, mask, old, adv, _ = make(dtype=dtype)
        assert int(mask.sum()) == 13
        hidden.requires_grad_()
        weight.requires_grad_()
        with CountMatmuls() as mode:
            fastpref.linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="torch").loss.backward()
        assert mode.count == calls, dtype


def test_three_matmuls_per_chunk_and_none_in_eval():
    n_kept = int(make()[4].sum())
    assert _matmuls(None)[0] == 3  # logits, grad hidden, grad weight: no recompute
    assert _matmuls(4)[0] == 3 * -(-n_kept // 4)
    assert _matmuls(None, importance="sequence")[0] == 4  # GSPO couples tokens: forward, then recompute
    count, out = _matmuls(None, grad=False)
    assert count == 1 and out.loss.grad_fn is None


def test_nn_module():
    from fastpref.nn import LinearPPOLoss

    hidden, weight, bias, labels, mask, old, adv, _ = make()
    mod = LinearPPOLoss(clip_high=0.28, loss_agg="seq-mean-token-mean")
    got = mod(hidden, weight, labels, old, adv, mask, bias=bias)
    want = fastpref.linear_ppo_loss(hidden, weight, labels, old, adv, mask, bias=bias, clip_high=0.28,
                                    loss_agg="seq-mean-token-mean")
    assert torch.equal(got.loss, want.loss) and "clip_high=0.28" in repr(mod)


def test_errors():
    hidden, weight, bias, labels, mask, old, adv, ref_hidden = make()
    f = fastpref.linear_ppo_loss
    with pytest.raises(ValueError, match=r"mask must be a tensor of shape \(3, 7\)"):
        f(hidden, weight, labels, old, adv, mask[:, :4])
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \(3,\)"):
        f(hidden, weight, labels, old, adv[:2], mask)
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 7\)"):
        f(hidden, weight, labels[:, :5], old, adv, mask)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 211\)"):
        f(hidden, weight, labels + 1000, old, adv, mask)
    with pytest.raises(ValueError, match=r"weight must be \[V, 8\]"):
        f(hidden, weight[:, :5], labels, old, adv, mask)
    with pytest.raises(ValueError, match="clip_low must be a finite number > 0"):
        f(hidden, weight, labels, old, adv, mask, clip_low=-1.0)
    with pytest.raises(ValueError, match="unknown loss_agg"):
        f(hidden, weight, labels, old, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        f(hidden, weight, labels, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="divergence= .* needs ref_hidden and ref_weight"):
        f(hidden, weight, labels, old, adv, mask, divergence="js")
    with pytest.raises(ValueError, match="pass both ref_hidden and ref_weight"):
        f(hidden, weight, labels, old, adv, mask, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        f(hidden, weight, labels, old, adv, mask, ref_hidden=ref_hidden, ref_weight=weight, divergence="kl")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        f(hidden, weight, labels, old, adv, mask, temperature=0.0)
