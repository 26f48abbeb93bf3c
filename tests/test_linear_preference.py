"""linear_dpo_loss: fused == unfused (float64 logits -> log-probs -> dpo_loss), the 3-matmul path, eval mode."""
import pytest
import torch

import fastpref
from conftest import CountMatmuls, backend_params, generator
from oracle import logprobs_f64
from test_logprobs import LargestAllocation, close

B, T, H, V = 3, 7, 8, 211


def make(seed=0, dtype=torch.float32):
    g = generator(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[B + 2, 3:] = -100
    ref = (torch.randn(B, generator=g) - 12, torch.randn(B, generator=g) - 12)
    return hidden, weight, bias, labels, ref


def unfused(hidden, weight, bias, labels, ref, loss_type, nll_coef=0.0, **kw):
    lp, _ = logprobs_f64(hidden @ weight.T + bias, labels)
    seq, lens = lp.sum(1), (labels != -100).sum(1)
    free = loss_type in ("simpo", "orpo")
    loss = fastpref.dpo_loss(seq[:B], seq[B:], None if free else ref[0].double(), None if free else ref[1].double(),
                             loss_type=loss_type, chosen_lengths=lens[:B], rejected_lengths=lens[B:], **kw).loss
    return loss - nll_coef * lp[:B].sum() / lens[:B].sum()


CASES = [("sigmoid", {}), ("ipo", {}), ("hinge", {"divergence": "js"}), ("sigmoid", {"divergence": "alpha", "alpha": 0.3}),
         ("robust", {"label_smoothing": 0.1}), ("aot", {}), ("orpo", {}), ("simpo", {"gamma": 0.3}),
         ("apo_zero", {}), ("sigmoid_norm", {"divergence": "forward_kl"})]


@pytest.mark.parametrize("backend", backend_params("torch", "cpu", "triton"))
# One chunk; chunks that split pairs, with H = 8 > 2 x 3 (two passes) or <= 2 x 4 and 2 x 7 (one pass, the open
# pair's gradients deferred); chunks of whole pairs.
@pytest.mark.parametrize("chunk_size", [None, 3, 4, 7, 11])
@pytest.mark.parametrize("loss_type,kw", CASES, ids=[c[0] + "-" + "-".join(map(str, c[1].values())) for c in CASES])
def test_fused_equals_unfused(backend, chunk_size, loss_type, kw):
    if backend == "triton" and chunk_size in (3, 4, 7) and loss_type not in ("sigmoid", "orpo"):
        pytest.skip("interpreter time: the chunked triton path is covered by sigmoid and orpo")
    hidden, weight, bias, labels, ref = make()
    ins = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    free = loss_type in ("simpo", "orpo")
    out = fastpref.linear_dpo_loss(ins[0], ins[1], labels, bias=ins[2], ref_chosen_logps=None if free else ref[0],
                                   ref_rejected_logps=None if free else ref[1], loss_type=loss_type, beta=0.2,
                                   nll_coef=0.5, chunk_size=chunk_size, backend=backend, **kw)
    expected = unfused(*refs, labels, ref, loss_type, nll_coef=0.5, beta=0.2, **kw)
    close(out.loss, expected, 1e-5, "loss")
    (out.loss * 1.7).backward()  # the upstream gradient scales the gradients computed in forward
    (expected * 1.7).backward()
    for name, a, r in zip(("hidden", "weight", "bias"), ins, refs):
        close(a.grad, r.grad, 2e-5, f"grad {name}")
    lp, _ = logprobs_f64(hidden.double() @ weight.double().T + bias.double(), labels)
    close(out.metrics["chosen_logps"], lp.sum(1)[:B], 1e-5, "chosen_logps")
    close(out.metrics["rejected_logps"], lp.sum(1)[B:], 1e-5, "rejected_logps")


@pytest.mark.parametrize("backend", backend_params("torch", "cpu"))
# One chunk; split pairs with a deferred buffer (sigmoid) or two passes (ipo).
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_bf16(backend, chunk_size, loss_type):
    """A bf16 head: one chunk writes the weight gradient in bf16 directly, several sum it in fp32 first."""
    hidden, weight, bias, labels, ref = make(dtype=torch.bfloat16)
    ins = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    with LargestAllocation() as mode:
        out = fastpref.linear_dpo_loss(ins[0], ins[1], labels, bias=ins[2], ref_chosen_logps=ref[0],
                                       ref_rejected_logps=ref[1], loss_type=loss_type, beta=0.2,
                                       chunk_size=chunk_size, backend=backend)
        out.loss.backward()
    assert (((V, H), torch.float32) in mode.seen) == (chunk_size is not None)
    expected = unfused(*refs, labels, ref, loss_type, beta=0.2)
    expected.backward()
    close(out.loss, expected, 1e-2, "loss")
    for name, a, r in zip(("hidden", "weight", "bias"), ins, refs):
        assert a.grad.dtype == torch.bfloat16
        close(a.grad, r.grad, 2e-2, f"grad {name}")


@pytest.mark.parametrize("backend", backend_params("torch", "cpu"))
def test_reference_from_hidden_states_equals_precomputed(backend):
    hidden, weight, bias, labels, _ = make()
    ref_hidden, ref_weight = torch.randn(2 * B, T, 5), torch.randn(V, 5)
    with torch.no_grad():
        ref = fastpref.linear_logprobs(ref_hidden, ref_weight, labels).sum(1)
    a = hidden.clone().requires_grad_()
    b = hidden.clone().requires_grad_()
    out1 = fastpref.linear_dpo_loss(a, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, backend=backend)
    out2 = fastpref.linear_dpo_loss(b, weight, labels, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:],
                                    backend=backend)
    out1.loss.backward()
    out2.loss.backward()
    assert torch.allclose(out1.loss, out2.loss) and torch.allclose(a.grad, b.grad)
    assert torch.allclose(out1.chosen_rewards, out2.chosen_rewards)


def _matmuls(chunk_size, loss_type="sigmoid", grad=True):
    hidden, weight, _, labels, ref = make()
    hidden.requires_grad_()
    weight.requires_grad_()
    with CountMatmuls() as mode, torch.set_grad_enabled(grad):
        out = fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                       loss_type=loss_type, chunk_size=chunk_size, backend="torch")
        if grad:
            out.loss.backward()
    return mode.count, out, mode.macs


def test_three_matmuls_when_chunks_hold_whole_pairs():
    one_chunk, *_ = _matmuls(None)
    assert one_chunk == 3  # logits, grad hidden, grad weight: no recompute
    pairs, *_ = _matmuls(11)  # every pair here has <= 10 tokens: chunks end on pair boundaries
    # Pairs larger than a chunk, and two deferred weight-sized buffers cost more than 4 chunks (2 H > 4 x 3):
    # forward, then recompute.
    split, *_ = _matmuls(3, loss_type="ipo")
    n_tokens = int((make()[3] != -100).sum())
    assert split == 4 * -(-n_tokens // 3)
    # A loss that sees a pair through its margin alone defers one buffer (H <= 4 x 3): one pass.
    *_, macs = _matmuls(3)
    assert macs == 3 * n_tokens * H * V
    assert pairs % 3 == 0 and pairs > 3  # several chunks, 3 matmuls each
    # Pairs larger than a chunk of 4 and H <= 2 x 4: one pass; a chunk that ends inside a pair splits its
    # weight-gradient matmul (rows of complete pairs, the open pair's chosen rows, its rejected rows), so
    # count multiply-adds rather than calls: every token goes through 3 matmuls of H x V.
    *_, macs = _matmuls(4)
    assert macs == 3 * n_tokens * H * V
    coupled, *_ = _matmuls(4, loss_type="aot")
    assert coupled == 4 * -(-n_tokens // 4)
    coupled, *_ = _matmuls(None, loss_type="aot")  # sorting couples pairs: two passes even in one chunk
    assert coupled == 4


MARGIN_CASES = [("sigmoid", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.1}),
                ("exo_pair", {"label_smoothing": 1e-3}), ("discopop", {})]


@pytest.mark.parametrize("backend", backend_params("torch", "cpu"))
@pytest.mark.parametrize("chunk_size", [3, 4, 7])
@pytest.mark.parametrize("loss_type,kw", MARGIN_CASES, ids=[c[0] for c in MARGIN_CASES])
def test_margin_losses_defer_one_buffer(backend, chunk_size, loss_type, kw, monkeypatch):
    """Without an NLL term these losses see a pair through rho_w - rho_l alone: the open pair's weight and bias
    gradients go to one buffer (chosen minus rejected), with the same gradients as the unfused loss."""
    from fastpref.ops import linear_preference

    made = []

    class Spy(linear_preference._DeferredPair):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(linear_preference, "_DeferredPair", Spy)
    hidden, weight, bias, labels, ref = make()
    ins = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    out = fastpref.linear_dpo_loss(ins[0], ins[1], labels, bias=ins[2], ref_chosen_logps=ref[0],
                                   ref_rejected_logps=ref[1], loss_type=loss_type, beta=0.2, chunk_size=chunk_size,
                                   backend=backend, **kw)
    expected = unfused(*refs, labels, ref, loss_type, beta=0.2, **kw)
    close(out.loss, expected, 1e-5, "loss")
    (out.loss * 1.7).backward()
    (expected * 1.7).backward()
    for name, a, r in zip(("hidden", "weight", "bias"), ins, refs):
        close(a.grad, r.grad, 2e-5, f"grad {name}")
    assert [len(d.acc_w) for d in made] == [1] and len(made[0].acc_b) == 1


def test_frozen_head_one_pass_with_pairs_split_across_chunks():
    # LoRA-style: no weight gradient, so nothing weight-sized is deferred; 2 matmuls per token.
    hidden, weight, bias, labels, ref = make()
    a = hidden.clone().requires_grad_()
    kw = dict(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], bias=bias, beta=0.2, chunk_size=3, backend="torch")
    with CountMatmuls() as mode:
        fastpref.linear_dpo_loss(a, weight, labels, **kw).loss.backward()
    n_tokens = int((labels != -100).sum())
    assert mode.macs == 2 * n_tokens * H * V
    r = hidden.double().requires_grad_()
    unfused(r, weight.double(), bias.double(), labels, ref, "sigmoid", beta=0.2).backward()
    close(a.grad, r.grad, 2e-5, "grad hidden")


def test_eval_mode_does_no_gradient_work():
    count, out, _ = _matmuls(None, grad=False)
    assert count == 1 and out.loss.grad_fn is None


@pytest.mark.parametrize("backend", backend_params("triton"))  # CUDA tensors on a GPU (conftest)
def test_triton_fp32_matches_torch_one_pass(backend):
    hidden, weight, bias, labels, ref = make()
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    kw = dict(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], bias=bias)
    fastpref.linear_dpo_loss(a, weight, labels, backend=backend, **kw).loss.backward()
    fastpref.linear_dpo_loss(b, weight, labels, backend="torch", **kw).loss.backward()
    close(a.grad, b.grad, 1e-5, "triton vs torch")


def test_nn_module():
    from fastpref.nn import LinearDPOLoss

    hidden, weight, _, labels, ref = make()
    mod = LinearDPOLoss(beta=0.3, loss_type="ipo")
    got = mod(hidden, weight, labels, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    want = fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                    beta=0.3, loss_type="ipo")
    assert torch.equal(got.loss, want.loss)


def test_linear_dpo_errors():
    hidden, weight, _, labels, ref = make()
    kw = dict(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    with pytest.raises(ValueError, match="even first dim"):
        fastpref.linear_dpo_loss(hidden[:5], weight, labels[:5], **kw)
    with pytest.raises(ValueError, match=r"labels must have shape \(6, 7\)"):
        fastpref.linear_dpo_loss(hidden, weight, labels[:, :6], **kw)
    with pytest.raises(ValueError, match=r"weight must be \[V, 8\]"):
        fastpref.linear_dpo_loss(hidden, weight[:, :7], labels, **kw)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fastpref.linear_dpo_loss(hidden, weight, labels, beta=-1.0, **kw)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        fastpref.linear_dpo_loss(hidden, weight, labels, label_smoothing=0.7, **kw)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'; valid: sigmoid"):
        fastpref.linear_dpo_loss(hidden, weight, labels, loss_type="kto", **kw)
    with pytest.raises(ValueError, match="needs ref_chosen_logps and ref_rejected_logps"):
        fastpref.linear_dpo_loss(hidden, weight, labels)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(3,\)"):
        fastpref.linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref[0][:2], ref_rejected_logps=ref[1])
    with pytest.raises(ValueError, match="not both"):
        fastpref.linear_dpo_loss(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight, **kw)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
            fastpref.linear_dpo_loss(hidden, weight, labels, chunk_size=bad, **kw)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="nll_coef must be a finite number >= 0"):
            fastpref.linear_dpo_loss(hidden, weight, labels, nll_coef=bad, **kw)
