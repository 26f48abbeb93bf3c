"""linear_logprobs vs the naive path (logits, log_softmax, gather), its torch.compile and Cut Cross-Entropy
(and Liger-Kernel's fused linear cross-entropy on a GPU): forward+backward time and peak memory.

    python benchmarks/logprobs.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

The cases live in ``fastpref/bench/logprobs.py`` (``fastpref bench --ops logprobs`` runs them as a size sweep).
"""
from harness import run_op

from fastpref.bench.logprobs import case  # noqa: F401  (importable from here, as before)

if __name__ == "__main__":
    run_op("logprobs")
