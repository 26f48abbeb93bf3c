"""fastpref: fused kernels for preference and RL post-training of language models.

Public functional API (see README.md and DESIGN.md for the math):

- ``token_logprobs(logits, labels, ...)``: per-token log-probs (and entropy) from logits.
- ``linear_logprobs(hidden, weight, labels, ...)``: the same from hidden states and the output head,
  without materializing the [N, V] logits.
- ``token_divergence(logits, ref_logits, divergence=...)`` / ``linear_token_divergence(...)``: full-vocabulary
  f-divergences D_f(pi || pi_ref) per position (registry: ``fastpref.divergences``).
- ``kl_estimate(logp, ref_logp, estimator=...)``: sampled KL estimators k1, k2, k3, low_var_kl and "+" variants.
- ``dpo_loss(...)`` / ``bt_loss(...)``: the DPO family (f-DPO scores, SimPO, ORPO) and Bradley-Terry losses
  over sequence log-probs; ``linear_dpo_loss(hidden, weight, labels, ...)`` fuses them with the log-probs.
- ``backends()``: which backends this process can use, and why the others are missing.
"""
from fastpref._backends import BackendInfo, backends
from fastpref.ops.divergence import linear_token_divergence, token_divergence
from fastpref.ops.kl import kl_estimate
from fastpref.ops.linear_preference import linear_dpo_loss
from fastpref.ops.logprobs import linear_logprobs, token_logprobs
from fastpref.ops.preference import PreferenceOutput, bt_loss, dpo_loss

__version__ = "0.1.0"

__all__ = ["BackendInfo", "PreferenceOutput", "backends", "bt_loss", "dpo_loss", "kl_estimate", "linear_dpo_loss", "linear_logprobs", "linear_token_divergence", "token_divergence",
           "token_logprobs", "__version__"]
