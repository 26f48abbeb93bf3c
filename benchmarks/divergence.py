"""token_divergence vs eager PyTorch (log_softmax of both + the formula, its torch.compile, and F.kl_div):
forward+backward time and peak memory.

    python benchmarks/divergence.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

The cases live in ``fastpref/bench/divergence.py`` (``fastpref bench --ops divergence`` runs them as a size sweep).
"""
from harness import run_op

from fastpref.bench.divergence import case  # noqa: F401  (importable from here, as before)

if __name__ == "__main__":
    run_op("divergence")
