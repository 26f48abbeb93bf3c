"""The bundled offline demo: an arithmetic language ("12+7=" -> "19") with a built-in tokenizer, a tiny
Llama built from a config, a verifiable reward, data generators for every trainer, and a pipeline
(``fastpref demo``) that runs SFT -> DPO, SFT -> reward model -> GRPO, and SFT -> PPO on a CPU in minutes.

``task`` holds the language, tokenizer, model and reward; ``pipeline`` the stages. Names load on first use,
so that building the ``fastpref`` command line stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"ArithmeticTask": "task", "build_model": "task", "build_tokenizer": "task", "reward_fn": "task",
            "DemoConfig": "pipeline", "accuracy": "pipeline", "format_summary": "pipeline",
            "preference_accuracy": "pipeline", "run": "pipeline"}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
