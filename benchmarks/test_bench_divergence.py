"""pytest-benchmark suite for token_divergence: ``pytest benchmarks/test_bench_divergence.py``.

Times only (memory is measured by ``benchmarks/divergence.py``, one process per implementation).
"""
import pytest
import torch
import torch.nn.functional as F

import fastpref

N, V = 1024, 32000
IMPLS = ["eager"] + [n for n in ("cpu", "torch") if fastpref.backends()[n].available]


@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
@pytest.mark.parametrize("impl", IMPLS)
def test_token_divergence_fwd_bwd(benchmark, impl, divergence):
    torch.manual_seed(0)
    logits = torch.randn(N, V, requires_grad=True)
    ref = torch.randn(N, V)

    def step():
        if impl == "eager":
            logp, logq = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
            if divergence == "reverse_kl":
                d = (logp.exp() * (logp - logq)).sum(-1)
            else:
                m = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0))
                d = 0.5 * ((logp.exp() * (logp - m)).sum(-1) + (logq.exp() * (logq - m)).sum(-1))
        else:
            d = fastpref.token_divergence(logits, ref, divergence=divergence, backend=impl)
        d.sum().backward()
        logits.grad = None

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
