"""linear_ppo_loss vs the eager TRL-style GRPO path, its torch.compile and Liger-Kernel's
LigerFusedLinearGRPOLoss: fwd+bwd time and peak memory; GRPO loss (seq-mean-token-mean), k3 KL (beta 0.04)
against a reference model given as hidden states + head, old log-probs from an earlier policy, completions of
random length (padding masked).

    python benchmarks/grpo.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

The cases live in ``fastpref/bench/grpo.py`` (``fastpref bench --ops grpo`` runs them as a size sweep).
"""
from harness import run_op

from fastpref.bench.grpo import case  # noqa: F401  (importable from here, as before)

if __name__ == "__main__":
    run_op("grpo")
