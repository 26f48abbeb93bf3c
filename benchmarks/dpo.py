"""linear_dpo_loss vs the eager TRL-style path, its torch.compile and Liger-Kernel's LigerFusedLinearDPOLoss:
fwd+bwd time and peak memory, sigmoid DPO with the reference computed from reference hidden states and head.

    python benchmarks/dpo.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

The cases live in ``fastpref/bench/dpo.py`` (``fastpref bench --ops dpo`` runs them as a size sweep).
"""
from harness import run_op

from fastpref.bench.dpo import case  # noqa: F401  (importable from here, as before)

if __name__ == "__main__":
    run_op("dpo")
