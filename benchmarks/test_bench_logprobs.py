"""pytest-benchmark suite for the log-prob ops: ``pytest benchmarks/test_bench_logprobs.py``.

Times only (memory is measured by ``benchmarks/logprobs.py``, one process per implementation).
"""
import pytest
import torch

import fastpref

N, H, V = 1024, 512, 32000
IMPLS = ["naive"] + [n for n in ("cpu", "torch") if fastpref.backends()[n].available]


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) * H**-0.5).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,))


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_fwd_bwd(benchmark, inputs, impl):
    hidden, weight, labels = inputs

    def step():
        if impl == "naive":
            lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            lp = fastpref.linear_logprobs(hidden, weight, labels, backend=impl)
        lp.sum().backward()
        hidden.grad = weight.grad = None

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_fwd_bwd(benchmark, impl):
    logits = torch.randn(2048, V, requires_grad=True)
    labels = torch.randint(0, V, (2048,))

    def step():
        if impl == "naive":
            lp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            lp = fastpref.token_logprobs(logits, labels, backend=impl)
        lp.sum().backward()
        logits.grad = None

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
