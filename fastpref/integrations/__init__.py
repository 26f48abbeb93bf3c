"""Glue to other libraries, one submodule each; nothing here is imported with ``fastpref``.

- ``fastpref.integrations.transformers``: the decoder and output head of a transformers causal LM (plain or
  PEFT-wrapped) so that fastpref's fused ops get hidden states instead of logits: ``lm_head``, ``Head``,
  ``decoder``, ``last_hidden_states``, ``score_head``, ``unwrap``.
- ``fastpref.integrations.trl``: TRL's DPO, Reward and GRPO trainers on fastpref's fused losses
  (``FastprefDPOTrainer``, ``FastprefRewardTrainer``, ``FastprefGRPOTrainer``, ``patch_trl``; extra
  ``fastpref[trl]``).

Submodules load on first use (``fastpref.integrations.transformers`` or ``from fastpref.integrations
import lm_head``), so that ``import fastpref`` never imports transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {name: "transformers" for name in ("Head", "decoder", "last_hidden_states", "lm_head", "score_head",
                                                "unwrap")}
_EXPORTS.update({name: "trl" for name in ("FastprefDPOTrainer", "FastprefGRPOTrainer", "FastprefRewardTrainer",
                                          "patch_trl")})


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = sorted(_EXPORTS)
