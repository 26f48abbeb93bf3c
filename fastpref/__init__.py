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
- ``ppo_loss(logp, old_logp, advantages, mask, ...)`` / ``value_loss(...)``: PPO/GRPO policy (clip, dual clip,
  GSPO, KL estimators or any per-token penalty, entropy bonus, four aggregations) and value losses;
  ``linear_ppo_loss(hidden, weight, labels, ...)`` fuses the policy loss with the log-probs and entropy;
  ``generator_penalty`` is DPH-RL's sampled f-divergence at tokens drawn from the initial policy.
- ``backends()``: which backends this process can use, and why the others are missing.
"""
from fastpref._backends import BackendInfo, backends
from fastpref.ops.divergence import linear_token_divergence, token_divergence
from fastpref.ops.kl import generator_penalty, kl_estimate
from fastpref.ops.linear_preference import linear_dpo_loss
from fastpref.ops.linear_policy import linear_ppo_loss
from fastpref.ops.logprobs import linear_logprobs, token_logprobs
from fastpref.ops.policy import PolicyOutput, ppo_loss, value_loss
from fastpref.ops.preference import PreferenceOutput, bt_loss, dpo_loss

__version__ = "0.1.0"

__all__ = ["BackendInfo", "PolicyOutput", "PreferenceOutput", "backends", "bt_loss", "dpo_loss", "generator_penalty",
           "kl_estimate", "linear_dpo_loss", "linear_logprobs", "linear_ppo_loss", "linear_token_divergence",
           "ppo_loss", "token_divergence", "token_logprobs", "value_loss", "__version__"]
