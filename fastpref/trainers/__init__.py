"""Thin TRL-shaped trainers on fastpref's fused ops: they read the decoder's last hidden states and the
output head's weight, never the [tokens x vocabulary] logits.

``SFTTrainer``/``SFTConfig``, ``RewardTrainer``/``RewardConfig`` (Bradley-Terry), ``DPOTrainer``/``DPOConfig``
and, when its module is present, ``PPOTrainer``/``PPOConfig``; all built on ``common.BaseTrainer`` and
``common.TrainerConfig`` (see ``fastpref/trainers/common.py`` for how a trainer plugs in). Names load on
first use, so that ``import fastpref.trainers`` stays cheap.
"""
from __future__ import annotations

import importlib
import importlib.util

_EXPORTS = {
    "BaseTrainer": "common", "TrainerConfig": "common",
    "SFTTrainer": "sft", "SFTConfig": "sft",
    "RewardTrainer": "reward", "RewardConfig": "reward",
    "DPOTrainer": "dpo", "DPOConfig": "dpo",
    "PPOTrainer": "ppo", "PPOConfig": "ppo",  # another engineer's module; absent until it lands
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
            raise
        raise AttributeError(f"{name} is not available: {__name__}.{module} is not installed") from None
    return getattr(mod, name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(n for n, m in _EXPORTS.items() if importlib.util.find_spec(f"{__name__}.{m}") is not None)
