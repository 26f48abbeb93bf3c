"""torch.compile(fullgraph=True) around the ops: each loss and its gradients in one graph (no break), equal to
the eager op.

On CPU every case runs through Dynamo and AOTAutograd (backend "aot_eager": the graph capture, fake shapes and
autograd registration that the custom ops of ``fastpref/ops/_library.py`` provide) with the native cpu
backend, and all of them in one graph through Inductor. On a GPU the cases run through Inductor with the
triton backend.
"""
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import fastpref

B, T, H, V = 2, 6, 8, 40


def make(device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    t = dict(hidden=torch.randn(2 * B, T, H, device=device, generator=g),
             weight=torch.randn(V, H, device=device, generator=g) * 0.5,
             bias=torch.randn(V, device=device, generator=g) * 0.1,
             logits=torch.randn(2 * B, T + 1, V, device=device, generator=g),
             ref_logits=torch.randn(2 * B, T + 1, V, device=device, generator=g),
             old_logp=-3 + torch.randn(2 * B, T, device=device, generator=g) * 0.3,
             ref_logp=-3 + torch.randn(2 * B, T, device=device, generator=g) * 0.3,
             adv=torch.randn(2 * B, device=device, generator=g),
             labels=torch.randint(0, V, (2 * B, T), device=device, generator=g))
    t["labels"][:, :2] = -100  # prompt
    t["labels"][1, 5:] = -100  # padding
    t["ref_hidden"] = t["hidden"] + 0.3 * torch.randn(2 * B, T, H, device=device, generator=g)
    t["mask"] = t["labels"] != -100
    return t


def _token_logprobs(t, backend):
    logp, entropy = fastpref.token_logprobs(t["logits"][:, :-1], t["labels"], temperature=0.7, return_entropy=True,
                                            backend=backend)
    return (logp * t["adv"][:, None]).sum() + 0.1 * entropy.sum()


def _linear_logprobs(t, backend):
    logp, entropy = fastpref.linear_logprobs(t["hidden"], t["weight"], t["labels"], bias=t["bias"], softcap=5.0,
                                             return_entropy=True, chunk_size=5, backend=backend)
    return (logp * t["adv"][:, None]).sum() - 0.1 * entropy.sum()


def _token_divergence(t, backend):
    return fastpref.token_divergence(t["logits"], t["ref_logits"], divergence="js", labels=None, backend=backend).mean()


def _linear_token_divergence(t, backend):
    return fastpref.linear_token_divergence(t["hidden"], t["weight"], t["ref_hidden"], t["weight"].detach(),
                                            divergence="alpha", alpha=0.3, labels=t["labels"], chunk_size=7,
                                            backend=backend).sum()


def _dpo_loss(t, backend):
    seq = t["logits"][:, :-1].logsumexp(-1).sum(-1)
    ref = t["ref_logits"][:, :-1].logsumexp(-1).sum(-1)
    return fastpref.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=0.2, backend=backend).loss


def _linear_dpo_loss(t, backend):
    return fastpref.linear_dpo_loss(t["hidden"], t["weight"], t["labels"], bias=t["bias"], ref_hidden=t["ref_hidden"],
                                    ref_weight=t["weight"].detach(), beta=0.2, chunk_size=5, backend=backend).loss


def _linear_dpo_loss_ipo(t, backend):
    return fastpref.linear_dpo_loss(t["hidden"], t["weight"], t["labels"], ref_chosen_logps=t["adv"][:B],
                                    ref_rejected_logps=t["adv"][B:], loss_type="ipo", nll_coef=0.1,
                                    backend=backend).loss


def _ppo_loss(t, backend):
    logp = fastpref.token_logprobs(t["logits"][:, :-1], t["labels"], backend=backend)
    return fastpref.ppo_loss(logp, t["old_logp"], t["adv"], t["mask"], ref_logp=t["ref_logp"], kl_coef=0.1,
                             loss_agg="seq-mean-token-mean").loss


def _linear_ppo_loss(t, backend):
    return fastpref.linear_ppo_loss(t["hidden"], t["weight"], t["labels"], t["old_logp"], t["adv"], t["mask"],
                                    ref_hidden=t["ref_hidden"], ref_weight=t["weight"].detach(), kl_coef=0.1,
                                    entropy_coef=0.01, chunk_size=5, backend=backend).loss


def _linear_ppo_loss_divergence(t, backend):
    return fastpref.linear_ppo_loss(t["hidden"], t["weight"], t["labels"], None, t["adv"], bias=t["bias"],
                                    ref_hidden=t["ref_hidden"], ref_weight=t["weight"].detach(),
                                    divergence="forward_kl", kl_coef=0.1, backend=backend).loss


def _grpo_step(t, backend):
    """Log-probs and entropy from the head, then the policy loss."""
    logp, entropy = fastpref.linear_logprobs(t["hidden"], t["weight"], t["labels"], return_entropy=True,
                                             backend=backend)
    return fastpref.ppo_loss(logp, t["old_logp"], t["adv"], t["mask"], entropy=entropy, entropy_coef=0.01).loss


# loss function -> the inputs it differentiates
CASES = {
    _token_logprobs: ("logits",),
    _linear_logprobs: ("hidden", "weight", "bias"),
    _token_divergence: ("logits", "ref_logits"),
    _linear_token_divergence: ("hidden", "weight"),
    _dpo_loss: ("logits",),
    _linear_dpo_loss: ("hidden", "weight", "bias"),
    _linear_dpo_loss_ipo: ("hidden", "weight"),
    _ppo_loss: ("logits",),
    _linear_ppo_loss: ("hidden", "weight"),
    _linear_ppo_loss_divergence: ("hidden", "weight", "bias"),
    _grpo_step: ("hidden", "weight"),
}


def check_compiled(cases, device, backend, compiler, **tol):
    """Compiles the loss functions of ``cases`` (loss function -> the inputs it differentiates) into one graph,
    each on inputs of its own, and checks every loss and gradient against the eager ones."""
    inputs = {fn: make(device, seed=i) for i, fn in enumerate(cases)}
    params = {fn: [inputs[fn][name].requires_grad_() for name in names] for fn, names in cases.items()}
    torch._dynamo.reset()
    losses = torch.compile(lambda: [fn(inputs[fn], backend) for fn in cases], fullgraph=True, backend=compiler)()
    # Each input belongs to one case, so the gradients of the sum are each case's own.
    grads = iter(torch.autograd.grad(sum(losses), [p for fn in cases for p in params[fn]]))
    for fn, loss in zip(cases, losses):
        ref = fn(inputs[fn], backend)
        ref_grads = torch.autograd.grad(ref, params[fn])
        torch.testing.assert_close(loss, ref, **tol, msg=lambda m: f"{fn.__name__[1:]}: {m}")
        for name, r in zip(cases[fn], ref_grads):
            assert r.abs().sum() > 0, (fn.__name__, name)
            torch.testing.assert_close(next(grads), r, **tol, msg=lambda m: f"{fn.__name__[1:]}: grad of {name}: {m}")


@pytest.mark.parametrize("fn", CASES, ids=lambda f: f.__name__[1:])
def test_fullgraph_cpu(fn):
    check_compiled({fn: CASES[fn]}, "cpu", "cpu", "aot_eager")


def test_dynamic_shapes():
    """One compiled graph (dynamic=True) over batches of different shapes."""
    def step(hidden, labels, adv):
        logp = fastpref.linear_logprobs(hidden, weight, labels)
        return (fastpref.ppo_loss(logp, logp.detach() - 0.1, adv, labels != -100).loss
                + fastpref.linear_ppo_loss(hidden, weight, labels, None, adv).loss)

    weight = make("cpu")["weight"].requires_grad_()
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for seed, (rows, cols) in enumerate(((2, 5), (4, 7))):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(rows, cols, H, generator=g).requires_grad_()
        labels = torch.randint(0, V, (rows, cols), generator=g)
        labels[:, 0] = -100
        adv = torch.randn(rows, generator=g)
        grads = torch.autograd.grad(compiled(hidden, labels, adv), (hidden, weight))
        for got, want in zip(grads, torch.autograd.grad(step(hidden, labels, adv), (hidden, weight))):
            torch.testing.assert_close(got, want)
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_fullgraph_inductor_cpu():
    """Every case in one graph compiled whole by Inductor around the ops, as the GPU test below compiles them."""
    check_compiled(CASES, "cpu", "cpu", "inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for Triton under Inductor")
def test_fullgraph_triton_gpu():
    """Every case in one Inductor graph: one compile. On an H200 one case alone took 38 s, most of it Inductor's
    start-up and code generation, and ten such tests did not finish in 199 s on 16 workers."""
    check_compiled(CASES, "cuda", "triton", "inductor")


def test_compiled_label_check():
    """The label range check (a host sync, not traced) runs when the compiled op executes."""
    t = make("cpu")
    t["labels"][0, 3] = V
    compiled = torch.compile(lambda: fastpref.linear_logprobs(t["hidden"], t["weight"], t["labels"]),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\)"):
        compiled()


def test_import_registers_nothing():
    """Importing fastpref neither imports Dynamo nor registers the custom ops (both cost seconds or ms)."""
    code = ("import sys, fastpref; assert 'torch._dynamo' not in sys.modules; "
            "assert 'fastpref.ops._library' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_changing_floats_do_not_recompile_each_call():
    """A float that changes between steps (a KL controller's kl_coef, a temperature or beta schedule) recompiles
    once, when Dynamo makes it symbolic, as in plain PyTorch code; the custom ops must not specialize on its
    value (a ``float`` in their schema did: one graph per value, eager fallback past the recompile limit)."""
    def step(t, temperature, coef):
        logp = fastpref.token_logprobs(t["logits"][:, :-1], t["labels"], temperature=temperature, backend="cpu")
        return (logp.sum()
                + fastpref.linear_ppo_loss(t["hidden"], t["weight"], t["labels"], None, t["adv"], bias=t["bias"],
                                           temperature=temperature, softcap=5.0, ref_logp=t["ref_logp"], kl_coef=coef,
                                           entropy_coef=coef, backend="cpu").loss
                + fastpref.linear_dpo_loss(t["hidden"], t["weight"], t["labels"], ref_chosen_logps=t["adv"][:B],
                                           ref_rejected_logps=t["adv"][B:], beta=coef, nll_coef=coef,
                                           backend="cpu").loss
                + fastpref.token_divergence(t["logits"], t["ref_logits"], divergence="alpha", alpha=coef,
                                            temperature=temperature, backend="cpu").sum())

    t = make("cpu")
    params = [t[name].requires_grad_() for name in ("logits", "hidden", "weight")]
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for temperature, coef in ((0.7, 0.1), (0.8, 0.2), (0.9, 0.3), (1.1, 0.4)):
        got = compiled(t, temperature, coef)
        grads = torch.autograd.grad(got, params)
        want = step(t, temperature, coef)
        torch.testing.assert_close(got, want)
        for g, r in zip(grads, torch.autograd.grad(want, params)):
            torch.testing.assert_close(g, r)
    assert counters["stats"]["unique_graphs"] - graphs <= 2
