"""The demo pipeline, every stage from the SFT model: SFT; DPO; a reward model (on the SFT backbone) and
GRPO against it (RLHF); PPO with GAE and a value head against the verifiable reward (RLVR).

Every stage is a fastpref trainer used as a user would (TRL-shaped config, list-of-dict datasets); each
writes ``DIR/<stage>/metrics.jsonl`` and its model. The demo adds held-out measures the trainers do not
know about, reported by their ``evaluate`` (so logged as ``eval_*`` through training): greedy exact-match
``accuracy`` on the held-out prompts and, for DPO, ``preference_accuracy``, the fraction of held-out pairs
with log p(correct) > log p(wrong).

Choices, from runs of this demo: the reward model learns from pairs on the SFT policy's own mistakes (16
samples per prompt, each distinct wrong one against the answer, as a labeler comparing samples would mark
them) plus synthetic plausible mistakes; on synthetic pairs alone it stays near 70% held-out pair accuracy
and RL against it games it. Its scores carry per-prompt offsets that a linear value head learns too slowly,
so the reward-model stage uses GRPO's group baseline; PPO with GAE runs against the verifiable reward.
Learning rates are far above TRL's defaults, which suit pretrained models, not an 84k-parameter one.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastpref.integrations.transformers import decoder, last_hidden_states, lm_head
from fastpref.trainers.data import Encoder, collate_pairs, pad_token_id, preference_examples
from fastpref.trainers.demo.task import ArithmeticTask, build_model, build_tokenizer, reward_fn
from fastpref.trainers.ppo import generate_completions

STAGES = ("sft", "dpo", "reward", "grpo", "ppo")
MAX_NEW_TOKENS = 5  # the longest answer (98) and EOS, and a token to spare


@dataclass
class DemoConfig:
    """Optimizer steps per stage (0 skips a stage, except sft, which every other stage starts from; grpo
    needs reward) and the shared sizes: ``eval_prompts`` None means the whole held-out set (377 problems);
    the reward model learns from ``pair_samples`` samples of each of ``pair_prompts`` training prompts
    (None: all) and from ``synthetic_pairs`` synthetic ones. The defaults take about 2 minutes on 2 CPU
    cores; ``quick()`` seconds (tests)."""

    sft_steps: int = 1500
    dpo_steps: int = 300
    reward_steps: int = 2000
    ppo_steps: int = 300
    grpo_steps: int = 300
    batch_size: int = 32
    eval_prompts: int | None = None
    pair_prompts: int | None = None
    pair_samples: int = 16
    synthetic_pairs: int = 10_000
    max_operand: int = 49
    seed: int = 0

    def __post_init__(self):
        if self.sft_steps < 1:
            raise ValueError("sft_steps must be >= 1: every other stage starts from the SFT model")

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(sft_steps=40, dpo_steps=6, reward_steps=6, ppo_steps=4, grpo_steps=4, batch_size=8,
                   eval_prompts=16, pair_prompts=32, pair_samples=2, synthetic_pairs=32)


@torch.no_grad()
def accuracy(model, tokenizer, prompts: list[str], *, batch_size=256) -> float:
    """Fraction of ``prompts`` whose greedy completion is exactly the answer."""
    was_training = model.training
    model.eval()
    hits = 0
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        ids = [tokenizer(p)["input_ids"] for p in chunk]
        out = generate_completions(model, tokenizer, ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        hits += sum(r == 1.0 for r in reward_fn(chunk, texts))
    model.train(was_training)
    return hits / len(prompts)


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs: list[dict]) -> float:
    """Fraction of ``pairs`` (prompt, chosen, rejected) with log p(chosen | prompt) > log p(rejected | prompt)
    under ``model``, tokenized as the DPO trainer does."""
    examples = preference_examples(pairs, Encoder(tokenizer), split="eval", prompt_required=True)
    batch = collate_pairs(examples, pad_id=pad_token_id(tokenizer))
    hidden = last_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    logp = lm_head(model).logprobs(hidden, batch["labels"][:, 1:]).sum(-1)
    B = len(pairs)
    return float((logp[:B] > logp[B:]).float().mean())


@torch.no_grad()
def sampled_pairs(model, tokenizer, rows: list[dict], *, samples: int, batch_size=512, seed=0) -> list[dict]:
    """Pairs on the policy's own mistakes: ``samples`` completions (temperature 1) per SFT row (prompt,
    completion = the answer); each distinct wrong one is rejected against the answer."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    pairs = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        ids = [tokenizer(r["prompt"])["input_ids"] for r in chunk for _ in range(samples)]
        texts = tokenizer.batch_decode(generate_completions(model, tokenizer, ids, max_new_tokens=MAX_NEW_TOKENS),
                                       skip_special_tokens=True)
        for k, r in enumerate(chunk):
            drawn = sorted(set(texts[k * samples:(k + 1) * samples]) - {r["completion"]})
            pairs += [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": t} for t in drawn]
    model.train(was_training)
    return pairs


def _tracked(trainer_cls, measure):
    """``trainer_cls`` whose ``evaluate`` also reports ``measure(model)`` (a dict of held-out measures)."""

    class Tracked(trainer_cls):
        def evaluate(self, eval_dataset=None):
            return {**super().evaluate(eval_dataset), **measure(self.model)}

    Tracked.__name__ = trainer_cls.__name__
    return Tracked


def run(out="fastpref-demo", *, config: DemoConfig | None = None, quiet=False) -> dict:
    """Runs the enabled stages, writes ``out/<stage>/`` (metrics.jsonl and the model), ``out/summary.json``
    and ``out/demo.png``; returns the summary: per stage its eval measures before and after training, the
    eval history (step 0 included) and the wall time."""
    from transformers.utils import logging

    threads, bars = torch.get_num_threads(), logging.is_progress_bar_enabled()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and leaves the other cores be)
    logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bars, between the trainers' own
    try:
        return _run(Path(out), config or DemoConfig(), quiet)
    finally:
        torch.set_num_threads(threads)
        if bars:
            logging.enable_progress_bar()


def _run(out: Path, cfg: DemoConfig, quiet: bool) -> dict:
    from fastpref.trainers import DPOConfig, DPOTrainer, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer
    from fastpref.trainers import SFTConfig, SFTTrainer

    out.mkdir(parents=True, exist_ok=True)
    tok, task = build_tokenizer(), ArithmeticTask(max_operand=cfg.max_operand, seed=cfg.seed)
    eval_rows = task.sft_dataset(cfg.eval_prompts, split="eval")
    eval_prompts = task.prompt_dataset(cfg.eval_prompts, split="eval")
    prompts = [r["prompt"] for r in eval_prompts]
    pairs = task.preference_dataset(cfg.eval_prompts, split="eval")
    greedy = (lambda model: {"accuracy": accuracy(model, tok, prompts)})
    summary = {}

    def stage(name, trainer):
        before = trainer.evaluate()
        t0 = time.perf_counter()
        history = trainer.train()
        seconds = time.perf_counter() - t0
        after = trainer.evaluate()
        trainer.save_model()
        evals = [h for h in history if any(k.startswith("eval_") for k in h)]
        last = [] if evals and evals[-1]["step"] == trainer.step else [{"step": trainer.step, **_prefixed(after)}]
        summary[name] = {"before": before, "after": after, "seconds": seconds,
                         "history": [{"step": 0, **_prefixed(before)}, *evals, *last]}
        return trainer.model

    def args(name, steps, **kw):
        return {"output_dir": str(out / name), "max_steps": steps, "per_device_train_batch_size": cfg.batch_size,
                "per_device_eval_batch_size": 256, "logging_steps": max(1, min(10, steps // 10)),
                "eval_steps": max(1, steps // 15), "save_steps": None, "report_to": ["jsonl"], "seed": cfg.seed,
                "disable_tqdm": quiet, **kw}

    sft = _tracked(SFTTrainer, greedy)(
        build_model(tok, seed=cfg.seed),
        args=SFTConfig(**args("sft", cfg.sft_steps, learning_rate=3e-3, lr_scheduler_type="constant")),
        train_dataset=task.sft_dataset(), eval_dataset=eval_rows, processing_class=tok)
    sft_policy = stage("sft", sft)
    if cfg.dpo_steps:
        both = (lambda model: {**greedy(model), "preference_accuracy": preference_accuracy(model, tok, pairs)})
        dpo = _tracked(DPOTrainer, both)(
            copy.deepcopy(sft_policy), ref_model=copy.deepcopy(sft_policy),
            args=DPOConfig(**args("dpo", cfg.dpo_steps, learning_rate=3e-4, beta=0.1)),
            train_dataset=task.preference_dataset(), eval_dataset=pairs, processing_class=tok)
        stage("dpo", dpo)
    rl = dict(learning_rate=1e-4, temperature=1.0, kl_coef=0.05, max_completion_length=MAX_NEW_TOKENS,
              max_prompt_length=None)
    if cfg.reward_steps:
        reward_model = build_model(tok, kind="reward", seed=cfg.seed)
        decoder(reward_model).load_state_dict(decoder(sft_policy).state_dict())  # TRL: the RM starts from SFT
        train_pairs = (sampled_pairs(sft_policy, tok, task.sft_dataset(cfg.pair_prompts), samples=cfg.pair_samples,
                                     seed=cfg.seed) + task.preference_dataset(cfg.synthetic_pairs, seed=1))
        eval_pairs = sampled_pairs(sft_policy, tok, eval_rows, samples=cfg.pair_samples, seed=cfg.seed + 1)
        rm_args = args("reward", cfg.reward_steps, learning_rate=1e-3, warmup_steps=min(100, cfg.reward_steps // 10),
                       per_device_train_batch_size=2 * cfg.batch_size)  # one bit per pair: larger batches
        rm = RewardTrainer(reward_model, args=RewardConfig(**rm_args),
                           train_dataset=train_pairs, eval_dataset=eval_pairs or pairs, processing_class=tok)
        reward_model = stage("reward", rm)
        if cfg.grpo_steps:  # GRPO's group baseline cancels the reward model's per-prompt offsets
            grpo = _tracked(PPOTrainer, greedy)(
                copy.deepcopy(sft_policy), reward_model=reward_model,
                args=PPOConfig(**args("grpo", cfg.grpo_steps, advantage_estimator="grpo", num_generations=8,
                                      num_ppo_epochs=1, use_kl_loss=True, kl_estimator="k3", **rl)),
                train_dataset=task.prompt_dataset(), eval_dataset=eval_prompts, processing_class=tok)
            stage("grpo", grpo)
    if cfg.ppo_steps:
        ppo = _tracked(PPOTrainer, greedy)(
            copy.deepcopy(sft_policy), reward_fn=reward_fn,
            args=PPOConfig(**args("ppo", cfg.ppo_steps, advantage_estimator="gae", value_learning_rate=3e-3, **rl)),
            train_dataset=task.prompt_dataset(), eval_dataset=eval_prompts, processing_class=tok)
        stage("ppo", ppo)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "demo.png")
    return summary


def _prefixed(metrics: dict) -> dict:
    return {f"eval_{k}": v for k, v in metrics.items()}


_TITLES = {"sft": "SFT", "dpo": "DPO (from SFT)", "reward": "reward model (from SFT)",
           "grpo": "GRPO vs the reward model", "ppo": "PPO (GAE) vs the verifiable reward"}
# What the plot and the table show per stage, with labels (the reward stage's accuracy is over pairs).
_SHOWN = {"sft": {"accuracy": "accuracy (greedy, held-out)"},
          "dpo": {"preference_accuracy": "log p(correct) > log p(wrong)", "rewards/accuracies": "rewards/accuracies",
                  "accuracy": "accuracy (greedy, held-out)"},
          "reward": {"accuracy": "pair accuracy (held-out samples)"},
          "grpo": {"reward": "reward-model score", "accuracy": "accuracy (greedy, held-out)"},
          "ppo": {"reward": "verifiable reward", "accuracy": "accuracy (greedy, held-out)"}}


def plot(summary: dict, path) -> None:
    """One panel per stage: its shown measures at each evaluation, from step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in STAGES if s in summary]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, label in _SHOWN[name].items():
            points = [(h["step"], h[f"eval_{key}"]) for h in summary[name]["history"] if f"eval_{key}" in h]
            ax.plot(*zip(*points), marker=".", label=label)
        ax.set_title(_TITLES[name])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table: stage, measure, before, after, seconds."""
    rows = [("stage", "measure", "before", "after", "seconds")]
    for name in STAGES:
        if name in summary:
            s = summary[name]
            for i, (key, label) in enumerate(_SHOWN[name].items()):
                rows.append((name if i == 0 else "", label, f"{s['before'][key]:.3f}", f"{s['after'][key]:.3f}",
                             f"{s['seconds']:.0f}" if i == 0 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
