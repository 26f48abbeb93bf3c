"""``fastpref train {sft,reward,dpo,ppo} [--config FILE.yaml] [--field value ...]``.

The YAML file is a mapping of:

- ``model``: a transformers model name or path (``from_pretrained``), or a config dict for a model built
  from scratch (``AutoConfig.for_model(**dict)``, e.g. ``{model_type: llama, vocab_size: 300, ...}``);
  the reward trainer loads a sequence classifier with ``num_labels=1``. The other models a trainer takes
  (``cli_models`` of the trainer class: ``ref_model`` for DPO; ``ref_model`` and ``reward_model``, a
  sequence classifier, for PPO) are given the same way.
- ``tokenizer``: name or path (default: ``model`` when that is a name or path).
- ``train_dataset`` / ``eval_dataset``: .jsonl/.json paths.
- ``peft`` (optional): ``peft.LoraConfig`` keyword arguments, applied to ``model``.
- any field of the trainer's config (``SFTConfig``, ``RewardConfig``, ``DPOConfig``, ``PPOConfig``).

Flags ``--name value`` (or ``--name=value``; ``--name`` alone means true) override the file's keys.
Strings are converted to the config field's type (``--learning_rate 1e-4``, ``--save_steps none``).
Unknown keys are errors that name the closest valid key. After training the model and tokenizer are saved
to ``output_dir`` (``save_model``). Under ``torchrun`` the same command runs data-parallel.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
import types
import typing
from pathlib import Path

# name -> "module:class"; a trainer whose module is missing is not offered.
TRAINERS = {
    "sft": "fastpref.trainers.sft:SFTTrainer",
    "reward": "fastpref.trainers.reward:RewardTrainer",
    "dpo": "fastpref.trainers.dpo:DPOTrainer",
    "ppo": "fastpref.trainers.ppo:PPOTrainer",
}
_DATA_KEYS = ("tokenizer", "train_dataset", "eval_dataset", "peft")


def available_trainers() -> list[str]:
    return [name for name, target in TRAINERS.items()
            if importlib.util.find_spec(target.split(":")[0]) is not None]


def _config_name(trainer: str) -> str:
    """``"dpo"`` -> ``"DPOConfig"``: each trainer class is named like its config."""
    return TRAINERS[trainer].split(":")[1].replace("Trainer", "Config")


def add_train_parser(sub) -> None:
    """The ``train`` subcommand (no heavy imports: ``fastpref bench`` builds the same parser)."""
    names = available_trainers()
    p = sub.add_parser(
        "train", help=f"train a model with a fastpref trainer ({', '.join(names)})",
        description="Train with a fastpref trainer. Settings come from --config FILE.yaml (model, tokenizer, "
                    "train_dataset, eval_dataset, peft, ref_model for dpo and ppo, reward_model for ppo, and any "
                    "field of the trainer's config) and from --<field> <value> flags, which override the file.",
        epilog=f"Config fields: see help(fastpref.trainers.<Name>) for {', '.join(map(_config_name, names))}. "
               "Put the --<field> flags after the trainer's name.", allow_abbrev=False)
    p.add_argument("trainer", choices=names, help="which trainer")
    p.add_argument("--config", default=None, help="YAML file with the run's settings")


def parse_overrides(tokens: list[str]) -> dict:
    """``["--a", "1", "--b=x", "--flag"]`` -> ``{"a": "1", "b": "x", "flag": "true"}``."""
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ValueError(f"expected --<field> [value], got {tok!r}")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def coerce(name: str, value, hint):
    """``value`` (a string from the command line, or what YAML parsed) as the field type ``hint``."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in allowed:
        return None
    if value is None and type(None) in allowed:
        return None
    # The most specific conversion first: "true" is a bool for `str | bool | None`, "3" an int for `int | str`.
    for t in sorted(allowed, key=lambda t: (bool, int, float).index(t) if t in (bool, int, float) else 3 + (t is str)):
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif t in (int, float) and not isinstance(value, bool):
            try:
                converted = t(value)
            except (TypeError, ValueError):
                continue
            if t is int and isinstance(value, float) and value != converted:
                continue
            return converted
        elif t is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        elif typing.get_origin(t) is list:
            return value.split(",") if isinstance(value, str) else list(value)
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"{name}: expected {names}, got {value!r}")


def load_spec(config_path, overrides: dict) -> dict:
    spec = {}
    if config_path is not None:
        import yaml

        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file {str(path)!r}")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: the YAML must be a mapping of keys to values, got {type(spec).__name__}")
    return {**spec, **overrides}


def trainer_class(name: str):
    module, cls = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_config(cls, spec: dict):
    """The trainer's config from the spec's config keys; unknown keys are errors naming the closest one."""
    hints = cls.config_class.field_types()
    known = [*hints, *cls.cli_models, *_DATA_KEYS]
    for key in spec:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r}{hint} Valid keys: {', '.join(sorted(known))}")
    return cls.config_class(**{k: coerce(k, v, hints[k]) for k, v in spec.items() if k in hints})


def build_model(source, kind: str, *, name: str, peft=None):
    """A model from a name/path or a config dict; ``kind`` "causal_lm" or "sequence_classification"."""
    import transformers

    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "sequence_classification": transformers.AutoModelForSequenceClassification}[kind]
    extra = {"num_labels": 1} if kind == "sequence_classification" else {}
    if isinstance(source, dict):
        if "model_type" not in source:
            raise ValueError(f"{name}: a config dict needs model_type (e.g. llama), got keys {sorted(source)}")
        model = auto.from_config(transformers.AutoConfig.for_model(**{**extra, **source}))
    elif isinstance(source, str):
        model = auto.from_pretrained(source, **extra)
    else:
        raise ValueError(f"{name}: expected a model name/path or a config dict, got {source!r}")
    if peft:
        import peft as peft_lib

        model = peft_lib.get_peft_model(model, peft_lib.LoraConfig(**peft))
    return model


def build_trainer(name: str, spec: dict):
    """The trainer for ``spec`` (models built, datasets tokenized)."""
    import torch
    from transformers import AutoTokenizer

    cls = trainer_class(name)
    config = build_config(cls, spec)
    if "model" not in spec:
        raise ValueError("model: required (a model name/path, or a config dict with model_type)")
    if "train_dataset" not in spec:
        raise ValueError("train_dataset: required (a .jsonl/.json file)")
    tokenizer_source = spec.get("tokenizer") or (spec["model"] if isinstance(spec["model"], str) else None)
    if tokenizer_source is None:
        raise ValueError("tokenizer: required when model is a config dict (a tokenizer name or path)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(config.seed)  # every rank builds the same from-config weights (rank 0's win anyway)
    models = {key: build_model(spec[key], kind, name=key, peft=spec.get("peft") if key == "model" else None)
              for key, kind in cls.cli_models.items() if key in spec}
    return cls(**models, args=config, train_dataset=spec["train_dataset"], eval_dataset=spec.get("eval_dataset"),
               processing_class=tokenizer)


def run(args, extra: list[str]) -> int:
    """Entry point of ``fastpref train``: 2 with a message on stderr for a bad config or dataset."""
    try:
        spec = load_spec(args.config, parse_overrides(extra))
        trainer = build_trainer(args.trainer, spec)
    except (ValueError, TypeError, OSError) as e:  # OSError: from_pretrained of a missing model or tokenizer
        print(f"fastpref train {args.trainer}: error: {e}", file=sys.stderr)
        return 2
    trainer.train()
    if trainer.eval_examples:
        metrics = trainer.evaluate()
        if trainer.is_main:
            print("eval: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    trainer.save_model()
    if trainer.is_main:
        print(f"saved the model to {trainer.output_dir}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
