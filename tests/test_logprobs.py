"""token_logprobs and linear_logprobs against float64 formulas, for every backend usable here."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpref
from conftest import backend_params
from oracle import logprobs_f64

BACKENDS = backend_params("torch", "cpu", "triton")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def close(actual, expected, rtol, name, floor=1e-12):
    """Relative error in norm; ``floor`` bounds the denominator for values that are legitimately ~0."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).norm() / expected.norm().clamp_min(floor)
    small = (actual - expected).abs().max()
    assert err <= rtol or small <= rtol * 1e-2, f"{name}: relative error {err:.3g} > {rtol}"


def make_labels(shape, V, ignore_frac=0.25, ignore_index=-100):
    labels = torch.randint(0, V, shape)
    labels[torch.rand(shape) < ignore_frac] = ignore_index
    return labels


def check_token(backend, logits, labels, *, temperature=1.0, entropy=True, ignore_index=-100, floor=1e-12,
                grad_rtol=None):
    dtype = logits.dtype
    x = logits.detach().requires_grad_()
    ref_x = logits.detach().double().requires_grad_()
    out = fastpref.token_logprobs(x, labels, temperature=temperature, return_entropy=entropy,
                                  ignore_index=ignore_index, backend=backend)
    lp, ent = out if entropy else (out, None)
    rlp, rent = logprobs_f64(ref_x, labels, temperature=temperature, ignore_index=ignore_index)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    close(lp, rlp, 2e-5, "logp", floor)
    gl = torch.randn_like(rlp)
    loss, ref_loss = (lp.double() * gl).sum(), (rlp * gl).sum()
    if entropy:
        close(ent, rent, 2e-5, "entropy", floor)
        gh = torch.randn_like(rent)
        loss, ref_loss = loss + (ent.double() * gh).sum(), ref_loss + (rent * gh).sum()
    loss.backward()
    ref_loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    close(x.grad, ref_x.grad, grad_rtol or TOL[dtype], "grad logits")
    ignored = labels == ignore_index
    assert (x.grad[ignored] == 0).all(), "ignored positions must get no gradient"
    return lp, ent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_dtypes(backend, dtype):
    V = 1000  # not a power of two
    logits = (torch.randn(2, 5, V) * 3).to(dtype)
    labels = make_labels((2, 5), V)
    labels[1] = -100  # a sequence where every position is ignored
    lp, ent = check_token(backend, logits, labels, temperature=0.7)
    assert (lp[1] == 0).all() and (ent[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_large_vocab_and_one_token(backend):
    V = 70001  # > 65536 and odd
    check_token(backend, torch.randn(3, V) * 4, torch.tensor([0, V - 1, 12345]))
    # Two whole 2048-wide blocks of the GPU kernels (no partial one), labels at both edges of each.
    check_token(backend, torch.randn(5, 4096) * 4, torch.tensor([0, 2047, 2048, 4095, -100]), temperature=0.7)
    check_token(backend, torch.randn(1, 1, 37), torch.tensor([[36]]), entropy=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_minus_inf_logits(backend):
    """A -inf logit (a masked vocabulary entry) is probability 0: log-probs, entropy and gradients are those of
    a large finite stand-in (the float64 oracle's), and its own gradient is 0."""
    logits = torch.randn(4, 4099) * 3
    logits[:, 100:300] = float("-inf")
    logits[1, -3:] = float("-inf")  # in the GPU kernels' partial last block too
    labels = torch.tensor([0, 5, -100, 4098])
    x = logits.clone().requires_grad_()
    lp, ent = fastpref.token_logprobs(x, labels, temperature=0.7, return_entropy=True, backend=backend)
    ref_x = logits.double().clamp_min(-1e4).requires_grad_()
    rlp, rent = logprobs_f64(ref_x, labels, temperature=0.7)
    close(lp, rlp, 2e-5, "logp")
    close(ent, rent, 2e-5, "entropy")
    gl, gh = torch.randn(4), torch.randn(4)
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    ((rlp * gl.double()).sum() + (rent * gh.double()).sum()).backward()
    close(x.grad, ref_x.grad, 2e-5, "grad logits")
    assert (x.grad[:, 100:300] == 0).all() and (x.grad[1, -3:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_strided_inputs(backend):
    V = 301
    full = torch.randn(2, 7, V)
    labels = make_labels((2, 6), V)
    # The TRL-style shifted slice: rows are strided, handled without a copy.
    check_token(backend, full[:, :-1], labels)
    # Vocabulary dimension not contiguous.
    check_token(backend, torch.randn(V, 4).t(), make_labels((4,), V), temperature=1.3)
    # A one-entry vocabulary's stride says nothing (a view (3, 2)[:, ::2] has strides (2, 2)).
    check_token(backend, torch.randn(3, 2)[:, ::2], torch.tensor([0, -100, 0]))
    # Labels of any integer width.
    check_token(backend, full[:, :-1], labels.to(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_partial_outputs(backend):
    """Only one output used: the other term's gradient must not leak in."""
    V = 129
    logits = torch.randn(6, V, requires_grad=True)
    labels = make_labels((6,), V, ignore_index=3)
    ref = logits.detach().double().requires_grad_()
    lp, ent = fastpref.token_logprobs(logits, labels, return_entropy=True, backend=backend, ignore_index=3)
    rlp, rent = logprobs_f64(ref, labels, ignore_index=3)
    ent.sum().backward()
    rent.sum().backward()
    close(logits.grad, ref.grad, 2e-5, "entropy-only grad")
    logits.grad = None
    fastpref.token_logprobs(logits, labels, backend=backend, ignore_index=3).sum().backward()
    ref.grad = None
    logprobs_f64(ref, labels, ignore_index=3)[0].sum().backward()
    close(logits.grad, ref.grad, 2e-5, "logp-only grad")


def check_linear(backend, hidden, weight, bias, labels, *, chunk_size=None, temperature=1.0, softcap=None,
                 rtol=2e-5):
    args = [t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp, ent = fastpref.linear_logprobs(args[0], args[1], labels, bias=args[2], temperature=temperature,
                                       softcap=softcap, return_entropy=True, chunk_size=chunk_size,
                                       backend=backend)
    logits = refs[0] @ refs[1].T + (refs[2] if refs[2] is not None else 0)
    rlp, rent = logprobs_f64(logits, labels, temperature=temperature, softcap=softcap)
    close(lp, rlp, rtol, "logp")
    close(ent, rent, rtol, "entropy")
    gl, gh = torch.randn_like(rlp), torch.randn_like(rent)
    ((lp.double() * gl).sum() + (ent.double() * gh).sum()).backward()
    ((rlp * gl).sum() + (rent * gh).sum()).backward()
    for name, a, r in zip(("hidden", "weight", "bias"), args, refs):
        if a is not None:
            assert a.grad.dtype == a.dtype
            close(a.grad, r.grad, TOL[a.dtype] if rtol < TOL[a.dtype] else rtol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_linear_logprobs_chunks(backend, chunk_size):
    B, T, H, V = 2, 5, 24, 1000
    labels = make_labels((B, T), V)
    labels[0] = -100
    check_linear(backend, torch.randn(B, T, H), torch.randn(V, H) * 0.3, torch.randn(V) * 0.1, labels,
                 chunk_size=chunk_size, temperature=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [2, 1])  # the backward in one vocabulary slice, and in three
def test_linear_logprobs_softcap_no_bias_large_vocab(backend, chunk_size):
    V, H = 70001, 16
    check_linear(backend, torch.randn(3, H), torch.randn(V, H), None, torch.tensor([5, -100, V - 1]),
                 softcap=4.0, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_logprobs_half(backend, dtype):
    V, H = 517, 32
    # The chunk matmul rounds logits to the input dtype on CPU, hence the bf16-level tolerance on values.
    check_linear(backend, torch.randn(2, 4, H).to(dtype), (torch.randn(V, H) * 0.2).to(dtype), None,
                 make_labels((2, 4), V), rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_hidden_only_and_no_grad(backend):
    """A frozen head gets no weight gradient work; under no_grad nothing is saved."""
    V, H = 203, 8
    hidden = torch.randn(5, H, requires_grad=True)
    weight = torch.randn(V, H)
    labels = make_labels((5,), V)
    fastpref.linear_logprobs(hidden, weight, labels, backend=backend).sum().backward()
    ref_h = hidden.detach().double().requires_grad_()
    logprobs_f64(ref_h @ weight.double().T, labels)[0].sum().backward()
    close(hidden.grad, ref_h.grad, 2e-5, "grad hidden")
    with torch.no_grad():
        out = fastpref.linear_logprobs(hidden, weight, labels, backend=backend)
    assert out.grad_fn is None


class LargestAllocation(TorchDispatchMode):
    """The largest tensor an op returned inside it (``largest``, bytes), and every (shape, dtype) returned
    (``seen``)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
                self.seen.add((tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_never_materializes_full_logits(backend):
    N, H, V, chunk = 64, 8, 3001, 16
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with LargestAllocation() as mode:
        lp, ent = fastpref.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=chunk,
                                           backend=backend)
        (lp.sum() + ent.sum()).backward()
    assert mode.largest <= 4 * max(chunk * V, V * H), f"a tensor of {mode.largest} bytes was allocated"


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_weight_grad_needs_no_fp32_copy(backend):
    """A bf16 head's gradient is written slice by slice in bf16: nothing [V, H]-sized in fp32 (the token-chunked
    backward accumulated it in an fp32 [V, H] buffer, twice the gradient's size)."""
    N, H, V, chunk = 24, 64, 3001, 4
    hidden = torch.randn(N, H, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H) * 0.2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,))
    labels[::5] = -100
    lp = fastpref.linear_logprobs(hidden, weight, labels, chunk_size=chunk, backend=backend)
    with LargestAllocation() as mode:
        lp.sum().backward()
    logits_bytes = chunk * V * 4  # the fp32 logits of a slice
    assert mode.largest <= max(logits_bytes, V * H * 2), f"a tensor of {mode.largest} bytes was allocated"
    assert weight.grad.dtype == torch.bfloat16


def test_auto_chunk_size_is_bounded():
    h = torch.randn(1, 1024)
    rows = fastpref.ops.logprobs.auto_chunk_size(100_000, 32000, h)
    assert 64 <= rows * 32000 * 4 <= 64 << 20 and rows % 64 == 0
    assert fastpref.ops.logprobs.auto_chunk_size(7, 32000, h) == 7
    assert fastpref.ops.logprobs.auto_chunk_size(10, 10**9, h) == 1


def test_head_chunk_size_takes_one_chunk_when_cheaper_than_the_fp32_accumulator():
    from fastpref.ops.logprobs import auto_chunk_size, head_chunk_size

    V, H = 1 << 20, 64
    half, full = torch.empty(1, H, dtype=torch.bfloat16), torch.empty(1, H)
    base = auto_chunk_size(10**6, V, half)
    assert base == 32  # 64 MiB of bf16 logits (CPU: the gradient overwrites them)
    # A bf16 head's fp32 [V, H] accumulator is 4 V H bytes: the bf16 logits of 2 H = 128 more rows.
    assert head_chunk_size(base + 128, V, half, weight_grad=True) == base + 128
    assert head_chunk_size(base + 129, V, half, weight_grad=True) == base
    assert head_chunk_size(base + 1, V, half, weight_grad=False) == base  # no weight gradient: no accumulator
    # fp32: the accumulator is the gradient itself.
    assert head_chunk_size(base + 1, V, full, weight_grad=True) == auto_chunk_size(base + 1, V, full)
    assert head_chunk_size(5, V, half, weight_grad=True) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_extreme_logits(backend):
    """Logits of +-50, a large offset, a near one-hot row: no overflow, no NaN, no cancellation.

    Near one-hot rows have entropies ~1e-12, and fp32 logits of 1e3 carry an absolute error of ~6e-5, so
    values are compared with an error relative to the logits' magnitude, not to the (tiny) values.
    """
    V = 777
    logits = torch.randn(4, V) * 50
    logits[1] += 1e3
    logits[2, 5] = 1e3
    # p = exp(z - lse) inherits lse's fp32 rounding at 1e3 (6e-5 absolute): hence 1e-4 on the gradient.
    check_token(backend, logits, torch.tensor([3, 4, 5, 6]), floor=float(logits.abs().max()), grad_rtol=1e-4)
