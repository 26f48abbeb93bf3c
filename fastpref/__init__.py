"""fastpref: fused kernels for preference and RL post-training of language models.

Public functional API (see README.md and DESIGN.md for the math):

- ``token_logprobs(logits, labels, ...)``: per-token log-probs (and entropy) from logits.
- ``linear_logprobs(hidden, weight, labels, ...)``: the same from hidden states and the output head,
  without materializing the [N, V] logits.
- ``backends()``: which backends this process can use, and why the others are missing.
"""
from fastpref._backends import BackendInfo, backends
from fastpref.ops.logprobs import linear_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = ["BackendInfo", "backends", "linear_logprobs", "token_logprobs", "__version__"]
