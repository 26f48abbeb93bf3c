"""PPO and GRPO with ``fastpref.linear_ppo_loss``: the policy's log-probs, ratio, clipped surrogate, KL and
entropy in one fused call on the decoder's hidden states, never the [tokens x vocabulary] logits.

A run alternates two phases (the ``BaseTrainer`` loop drives them through ``next_micro_batches``):

1. Rollout: sample completions of a batch of prompts with ``model.generate`` under no_grad, score them
   (a reward model or a Python ``reward_fn``), and compute what the losses need: reference log-probs
   (``linear_logprobs`` from the reference's hidden states), values (a linear value head on the policy's
   last hidden states), advantages (GAE, or group-relative as in GRPO).
2. Optimization: ``num_ppo_epochs`` passes over the rollout in ``num_mini_batches`` shuffled mini-batches,
   one optimizer step each (``gradient_accumulation_steps`` micro-batches of
   ``per_device_train_batch_size`` sequences).

Batch layout: prompts left-padded (with the position ids ``generate`` uses), completions right-padded
after them, so every completion starts at the same column and per-token tensors are [B, C].
"""
from __future__ import annotations

import copy
import importlib
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from fastpref.divergences import REGISTRY
from fastpref.integrations.transformers import last_hidden_states, lm_head, score_head, unwrap
from fastpref.ops.kl import ESTIMATORS, kl_estimate
from fastpref.ops.linear_policy import linear_ppo_loss
from fastpref.ops.policy import LOSS_AGGS, value_loss
from fastpref.trainers.common import BaseTrainer, TrainerConfig, disable_dropout, weight_decay_groups
from fastpref.trainers.data import IGNORE_INDEX, Encoder, check_columns, load_records, pad_token_id
from fastpref.trainers.reward import sequence_rewards

ADVANTAGE_ESTIMATORS = ("gae", "grpo")


@dataclass
class PPOConfig(TrainerConfig):
    """TRL's PPOConfig names and defaults (learning_rate 3e-6, num_ppo_epochs 4, num_mini_batches 1,
    cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, gamma 1.0, lam 0.95, kl_coef 0.05 with the k1 estimator
    in the reward, temperature 0.7, dropout disabled), with GRPO's where PPO has none.

    - ``advantage_estimator``: "gae" (value head, TRL PPO) or "grpo" (``num_generations`` samples per
      prompt, ``(r - mean) / (std + 1e-4)`` per group with the unbiased std, TRL GRPO; ``scale_rewards``
      False drops the std, Dr. GRPO). ``num_generations`` None: 1 for gae, 8 for grpo (TRL's default).
    - KL to a frozen reference (built only when ``kl_coef`` > 0): in the reward by default (per token
      ``-kl_coef * k``, OpenRLHF/TRL PPO; for grpo the sequence reward gets ``-kl_coef * sum_t k``), or in
      the loss with ``use_kl_loss`` (GRPO; set ``kl_estimator="k3"`` as TRL GRPO does); ``divergence``
      (reverse_kl, forward_kl, js, alpha, tv, hellinger) puts the full-vocabulary D_f(pi || pi_ref) in the
      loss instead of a sampled estimate.
    - ``cliprange_high``: DAPO's clip-higher (None: ``cliprange``). ``loss_agg``: any of ``ppo_loss``'s,
      default token-mean (TRL's "dapo"/"bnpo"); "seq-mean-token-sum-norm" (Dr. GRPO) pads completions to
      ``max_completion_length``, the constant TRL divides by.
    - ``per_device_train_batch_size`` counts sequences (completions); a rollout holds
      ``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` of them per rank,
      that is this over ``num_generations`` prompts. ``max_steps`` counts optimizer steps.
    - ``value_learning_rate`` (None: ``learning_rate``, as TRL): the value head's own rate, as OpenRLHF's
      ``critic_learning_rate`` (9x the actor's by default there); a zero-initialized linear head at a policy
      learning rate barely moves in a run.
    - ``reward_fn``: "module:function" (for the CLI; a callable can be passed to the trainer instead).
      ``missing_eos_penalty`` is subtracted from the reward of completions cut by the length limit (TRL).
    """

    learning_rate: float = 3e-6
    advantage_estimator: str = "gae"
    num_generations: int | None = None
    scale_rewards: bool = True
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    cliprange: float = 0.2
    cliprange_high: float | None = None
    cliprange_value: float | None = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    use_kl_loss: bool = False
    divergence: str | None = None
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    temperature: float = 0.7
    max_prompt_length: int | None = 512
    max_completion_length: int = 256
    value_learning_rate: float | None = None
    missing_eos_penalty: float | None = None
    reward_fn: str | None = None
    use_chat_template: bool | None = None
    disable_dropout: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator {self.advantage_estimator!r} is unknown; use one of "
                             f"{list(ADVANTAGE_ESTIMATORS)}")
        if self.num_generations is None:
            self.num_generations = 8 if self.advantage_estimator == "grpo" else 1
        if self.advantage_estimator == "grpo" and self.num_generations < 2:
            raise ValueError("advantage_estimator='grpo' needs num_generations >= 2 (a group per prompt)")
        rollout = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
        if self.num_generations < 1 or rollout % self.num_generations:
            raise ValueError(f"a rollout of per_device_train_batch_size x gradient_accumulation_steps x "
                             f"num_mini_batches = {rollout} sequences must hold whole groups of "
                             f"num_generations = {self.num_generations}")
        for name in ("num_ppo_epochs", "num_mini_batches", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.kl_estimator not in ESTIMATORS:
            raise ValueError(f"kl_estimator {self.kl_estimator!r} is unknown; use one of {list(ESTIMATORS)}")
        if self.divergence is not None and (self.divergence not in REGISTRY or not self.use_kl_loss):
            raise ValueError(f"divergence must be one of {list(REGISTRY)} and needs use_kl_loss=True, got "
                             f"{self.divergence!r} with use_kl_loss={self.use_kl_loss}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg {self.loss_agg!r} is unknown; use one of {list(LOSS_AGGS)}")
        if not self.temperature > 0 or self.kl_coef < 0:
            raise ValueError("temperature must be > 0 and kl_coef >= 0")

    @property
    def rollout_size(self) -> int:
        """Sequences per rollout per rank."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches


def left_pad(prompts, completions=None, *, pad_id, length=0):
    """``input_ids``, ``attention_mask`` and ``position_ids`` [B, P + length] of prompts left-padded to the
    longest (P) and completions right-padded to ``length``, and ``labels`` [B, length] (the completion
    tokens, ``IGNORE_INDEX`` on padding). Positions count attended tokens from 0, as ``generate`` does."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P + length), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + length), dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):P] = torch.tensor(p)
        attn[i, P - len(p):P] = 1
        if completions is not None:
            c = completions[i]
            ids[i, P:P + len(c)] = labels[i, :len(c)] = torch.tensor(c)
            attn[i, P:P + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(1) - 1).clamp(min=0),
            "labels": labels}


@torch.no_grad()
def generate_completions(model, tokenizer, prompts, *, max_new_tokens, temperature=1.0, do_sample=True):
    """Completions of ``prompts`` (lists of token ids) with ``model.generate``: a list of token-id lists,
    each cut after its first EOS (kept); a completion without EOS hit the length limit. Sampling is from
    the full distribution at ``temperature`` (no top-k/top-p, as TRL), so that PPO's log-probs are those
    of the sampling policy; ``do_sample=False`` is greedy decoding."""
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    device = next(model.parameters()).device
    batch = left_pad(prompts, pad_id=pad)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **sampling)
    out = unwrap(model).generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device), generation_config=config)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def gae_advantages(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalized advantage estimation over completion tokens [B, T] whose ``mask`` is a prefix of each
    row: ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, V = 0 past the
    end. Returns (advantages, returns = advantages + values), both 0 on masked tokens."""
    m = mask.float()
    rewards, values = rewards.float() * m, values.float() * m
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else 0.0
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv * m, (adv + values) * m


def group_advantages(rewards, num_generations, *, scale=True, eps=1e-4):
    """GRPO: ``r - mean(group)``, over ``std(group) + eps`` (unbiased std, TRL) when ``scale``; rewards [B]
    with each prompt's ``num_generations`` samples consecutive. Returns advantages [B]."""
    groups = rewards.float().view(-1, num_generations)
    adv = groups - groups.mean(1, keepdim=True)
    if scale:
        adv = adv / (groups.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def masked_whiten(x, mask, *, eps=1e-8):
    """``(x - mean) / std`` over the unmasked entries (unbiased variance, TRL's ``masked_whiten``), 0 on
    masked ones."""
    m = mask.float()
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def _import(path: str):
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"reward_fn must be 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


class PPOTrainer(BaseTrainer):
    """TRL-shaped PPO / GRPO (see the module docstring for the phases and ``PPOConfig`` for the choices).

    Args: ``model`` (causal LM, plain or PEFT), ``ref_model`` (frozen reference; None: the PEFT model with
    its adapters disabled, or a frozen copy of the model; none is built when ``kl_coef`` is 0),
    ``reward_model`` (a one-label sequence classifier sharing the tokenizer, scored at the last token) or
    ``reward_fn(prompts, completions, **columns) -> list[float]`` (TRL's reward-function signature: the
    completions decoded without special tokens, the dataset's other columns as keyword lists),
    ``train_dataset`` / ``eval_dataset`` with a ``prompt`` column.

    Choices where TRL leaves room: the value head is ``nn.Linear(hidden, 1)`` (zero-initialized) on the
    policy's last hidden states, detached: a critic on the policy's features whose loss never pulls them
    (with the gradient reaching the shared trunk, as in TRL's old value-head models, the demo's policy lost
    accuracy while the value loss was large). It is saved with checkpoints and as
    ``value_head.safetensors`` by ``save_model``.
    Old log-probs: with ``num_mini_batches=1`` and the KL not in the reward, the first optimizer step of
    a rollout runs on-policy (``old_logp=None``: ratio 1, the policy has not moved) and its fused call's
    ``metrics["logp"]`` becomes the later epochs' ``old_logp``, which saves a forward pass over the rollout.
    A resumed run starts with a fresh rollout. ``evaluate`` decodes the eval prompts greedily and reports
    the mean reward.

    Metrics (TRL's names): ``reward``, ``reward_std``, ``frac_reward_zero_std`` (grpo),
    ``completions/mean_length``, ``completions/clipped_ratio``, ``kl`` (sampled, in the reward or the
    loss), ``entropy``, ``clip_ratio/low|high|region``, ``ratio/mean|min|max``, ``policy_loss``,
    ``value_loss``, ``vf_clipfrac``, ``vpred``, ``objective/rlhf_reward`` (reward minus the KL penalty).
    """

    config_class = PPOConfig
    cli_models = {"model": "causal_lm", "ref_model": "causal_lm", "reward_model": "sequence_classification"}

    def __init__(self, model, ref_model=None, reward_model=None, reward_fn=None, args=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, optimizers=(None, None)):
        args = PPOConfig() if args is None else args
        # Before BaseTrainer.__init__, which may list the trainable parameters (the head among them).
        self.value_head = None
        if getattr(args, "advantage_estimator", None) == "gae":
            self.value_head = torch.nn.Linear(lm_head(model).weight.shape[1], 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, optimizers)
        a = self.args
        if self.value_head is not None:
            self.value_head.to(self.device)
        if isinstance(reward_fn, str) or (reward_fn is None and reward_model is None and a.reward_fn):
            reward_fn = _import(reward_fn or a.reward_fn)
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("pass exactly one of reward_model (a sequence classifier) and reward_fn "
                             "(prompts, completions -> list of floats; or PPOConfig.reward_fn='module:function')")
        self.reward_fn, self.reward_model = reward_fn, reward_model
        if reward_model is not None:
            score_head(reward_model)  # fails early for a model without a scalar head
            self.broadcast_module(reward_model.to(self.device))
            reward_model.eval().requires_grad_(False)
        self.peft = hasattr(model, "disable_adapter")
        if a.kl_coef > 0 and ref_model is not None:
            self.broadcast_module(ref_model.to(self.device))
        elif a.kl_coef > 0 and not self.peft:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.ref_model = ref_model if a.kl_coef > 0 else None
        self.use_ref = a.kl_coef > 0
        if a.disable_dropout:
            for m in (model, self.ref_model, reward_model):
                if m is not None:
                    disable_dropout(m)
        self.pad_id = pad_token_id(processing_class)
        self._queue, self._buffer, self._rollout_metrics = [], None, {}

    # ---- data --------------------------------------------------------------------------------------
    def prepare_dataset(self, data, *, split):
        records = load_records(data, split=split)
        check_columns(records, [("prompt",)], split=split, kind="PPO prompt")
        enc = Encoder(self.processing_class, use_chat_template=self.args.use_chat_template,
                      max_prompt_length=self.args.max_prompt_length)
        return [{"prompt": r["prompt"], "prompt_ids": enc.prompt(r["prompt"], where=f"{split}_dataset[{i}]"),
                 "columns": {k: v for k, v in r.items() if k != "prompt"}} for i, r in enumerate(records)]

    def micro_batches_per_epoch(self) -> int:
        # An epoch is a pass over the prompts: its rollouts times the optimizer steps of each.
        prompts = len(self._shard(len(self.train_examples), epoch=0))
        rollouts = math.ceil(prompts * self.args.num_generations / self.args.rollout_size)
        return rollouts * self._steps_per_rollout() * self.args.gradient_accumulation_steps

    def _steps_per_rollout(self) -> int:
        return self.args.num_ppo_epochs * self.args.num_mini_batches

    def _rollout_prompts(self, rollout: int) -> list[dict]:
        """The prompts of the ``rollout``-th rollout: consecutive slices of the per-epoch shuffled shards."""
        n = self.args.rollout_size // self.args.num_generations
        per_epoch = len(self._shard(len(self.train_examples), epoch=0))
        out, pos = [], rollout * n
        while len(out) < n:
            epoch, offset = divmod(pos, per_epoch)
            take = self._shard(len(self.train_examples), epoch=epoch)[offset:offset + n - len(out)]
            out += [self.train_examples[i] for i in take]
            pos += len(take)
        return out

    def micro_batch_weights(self, micro_batches):
        if self.args.loss_agg != "token-mean":
            return super().micro_batch_weights(micro_batches)
        # Each micro-batch's loss is its token mean: weighting by its share of the step's tokens (over all
        # ranks, whose gradients are then averaged) gives the token mean of the whole step.
        counts = torch.tensor([float((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches])
        total = float(self._all_sum(counts.sum().reshape(1)).item())
        return (counts * self.world_size / max(total, 1.0)).tolist()

    # ---- rollout ---------------------------------------------------------------------------------------
    def _completion_hidden(self, model, batch):
        """The hidden states that predict each completion token, [B, C, H]."""
        with self.autocast():
            hidden = last_hidden_states(model, batch["input_ids"], batch["attention_mask"],
                                        position_ids=batch["position_ids"])
        return hidden[:, -batch["labels"].shape[1] - 1:-1]

    def _reference(self):
        """(reference model, context to enter): the frozen copy, or the PEFT model without adapters."""
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        return self.model, self.model.disable_adapter()

    def _logprobs(self, model, batch):
        hidden = self._completion_hidden(model, batch)
        return lm_head(model).logprobs(hidden, batch["labels"], dtype=self.compute_dtype,
                                       temperature=self.args.temperature)

    def _scores(self, examples, completions, batch) -> torch.Tensor:
        if self.reward_model is not None:
            with self.autocast():
                return sequence_rewards(self.reward_model, batch["input_ids"], batch["attention_mask"],
                                        position_ids=batch["position_ids"])
        texts = self.processing_class.batch_decode(completions, skip_special_tokens=True)
        columns = {k: [e["columns"][k] for e in examples] for k in examples[0]["columns"]}
        scores = self.reward_fn([e["prompt"] for e in examples], texts, **columns)
        return torch.tensor([float("nan") if s is None else float(s) for s in scores], device=self.device)

    def _completion_length(self, completions) -> int:
        if self.args.loss_agg == "seq-mean-token-sum-norm":
            return self.args.max_completion_length
        return max(len(c) for c in completions)

    @torch.no_grad()
    def rollout(self, prompts: list[dict]) -> dict:
        """Samples ``num_generations`` completions per prompt and returns the rollout buffer: the batch
        tensors [n, ...] (``input_ids``, ``attention_mask``, ``position_ids``, ``labels``, ``advantages``,
        ``old_logp`` (NaN until the first step fills it, see the class docstring) and, as configured,
        ``ref_logp``, ``values``, ``returns``) and the rollout's ``metrics``."""
        a = self.args
        examples = [e for e in prompts for _ in range(a.num_generations)]
        was_training = self.model.training
        self.model.eval()
        completions, bs = [], a.per_device_train_batch_size
        for s in range(0, len(examples), bs):
            with self.autocast():
                completions += generate_completions(self.model, self.processing_class,
                                                    [e["prompt_ids"] for e in examples[s:s + bs]],
                                                    max_new_tokens=a.max_completion_length, temperature=a.temperature)
        buf = self.to_device(left_pad([e["prompt_ids"] for e in examples], completions, pad_id=self.pad_id,
                                      length=self._completion_length(completions)))
        parts = self._score_and_evaluate(examples, completions, buf)
        self.model.train(was_training)
        metrics = self._advantages(buf, parts, truncated=torch.tensor(
            [c[-1] != self.processing_class.eos_token_id for c in completions], device=self.device))
        keys = sorted(metrics)
        means = self._all_sum(torch.stack([metrics[k].float() for k in keys]).double()) / self.world_size
        return {"batch": buf, "metrics": dict(zip(keys, means.tolist()))}

    def _score_and_evaluate(self, examples, completions, buf) -> dict:
        """Per chunk of the rollout: the scores, and as configured the old log-probs (needed at rollout
        when the KL is in the reward or there are several mini-batches), values and reference log-probs."""
        a, bs = self.args, self.args.per_device_train_batch_size
        need_old = (self.use_ref and not a.use_kl_loss) or a.num_mini_batches > 1
        parts = {"scores": [], "old_logp": [], "ref_logp": [], "values": []}
        for s in range(0, len(examples), bs):
            chunk = {k: v[s:s + bs] for k, v in buf.items()}
            parts["scores"].append(self._scores(examples[s:s + bs], completions[s:s + bs], chunk))
            if need_old or self.value_head is not None:
                hidden = self._completion_hidden(self.model, chunk)
                if need_old:
                    parts["old_logp"].append(lm_head(self.model).logprobs(
                        hidden, chunk["labels"], dtype=self.compute_dtype, temperature=a.temperature))
                if self.value_head is not None:
                    parts["values"].append(self.value_head(hidden.float()).squeeze(-1))
            if self.use_ref and a.divergence is None:
                ref, ctx = self._reference()
                with ctx:
                    parts["ref_logp"].append(self._logprobs(ref, chunk))
        return {k: torch.cat(v) for k, v in parts.items() if v}

    def _advantages(self, buf, parts, *, truncated) -> dict:
        """Fills ``buf`` with the advantages (and what the losses need); returns the rollout metrics."""
        a, mask = self.args, buf["labels"] != IGNORE_INDEX
        scores = parts["scores"]
        metrics = {"reward": scores.nanmean(), "reward_std": scores.std() if len(scores) > 1 else scores.new_zeros(()),
                   "completions/mean_length": mask.sum(1).float().mean(),
                   "completions/clipped_ratio": truncated.float().mean()}
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * truncated.float()
        scores = scores.nan_to_num(0.0)
        penalty = torch.zeros_like(mask, dtype=torch.float32)
        if self.use_ref and not a.use_kl_loss:  # the KL in the reward, per token
            k = torch.where(mask, kl_estimate(parts["old_logp"], parts["ref_logp"], estimator=a.kl_estimator), 0.0)
            penalty = a.kl_coef * k
            metrics["kl"] = k.sum() / mask.sum()
            metrics["objective/rlhf_reward"] = (scores - penalty.sum(1)).mean()
        if a.advantage_estimator == "grpo":
            adv = group_advantages(scores - penalty.sum(1), a.num_generations, scale=a.scale_rewards)
            std = scores.view(-1, a.num_generations).std(1)
            metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean()
            buf["advantages"] = adv.unsqueeze(1).expand_as(mask).contiguous()
        else:
            rewards = -penalty
            rewards[torch.arange(len(scores), device=scores.device), mask.sum(1) - 1] += scores
            adv, buf["returns"] = gae_advantages(rewards, parts["values"], mask, gamma=a.gamma, lam=a.lam)
            buf["advantages"], buf["values"] = masked_whiten(adv, mask), parts["values"] * mask
        # NaN: filled by the first (on-policy) optimizer step of the rollout
        buf["old_logp"] = parts.get("old_logp", torch.full(mask.shape, float("nan"), device=mask.device))
        if a.use_kl_loss and "ref_logp" in parts:
            buf["ref_logp"] = parts["ref_logp"]
        return metrics

    # ---- optimization -------------------------------------------------------------------------------
    def on_train_begin(self):
        self._queue = []

    def next_micro_batches(self):
        """The next optimizer step's micro-batches from the rollout buffer; a new rollout when it is spent
        (each rollout serves ``num_ppo_epochs x num_mini_batches`` steps, reshuffled each epoch)."""
        a = self.args
        if not self._queue:
            spr = self._steps_per_rollout()
            self._buffer = self.rollout(self._rollout_prompts(self.step // spr))
            self._rollout_metrics = self._buffer["metrics"]
            n, size, bs = a.rollout_size, a.rollout_size // a.num_mini_batches, a.per_device_train_batch_size
            steps = []
            for _ in range(a.num_ppo_epochs):
                order = torch.randperm(n).tolist()
                for m in range(a.num_mini_batches):
                    mini = order[m * size:(m + 1) * size]
                    steps.append([mini[k:k + bs] for k in range(0, size, bs)])
            self._queue = steps[self.step % spr:]  # a resumed run joins mid-rollout
        return [self._micro_batch(idx) for idx in self._queue.pop(0)]

    def _micro_batch(self, idx) -> dict:
        rows = torch.tensor(idx, device=self.device)
        batch = {k: v.index_select(0, rows) for k, v in self._buffer["batch"].items()}
        if torch.isnan(batch["old_logp"]).any():
            del batch["old_logp"]  # not filled yet: the policy has not been updated since the rollout
        batch["index"] = rows
        return batch

    def training_step(self, micro_batches):
        metrics = super().training_step(micro_batches)
        return None if metrics is None else {**metrics, **self._rollout_metrics}

    def trainable_named_parameters(self):
        head = [] if self.value_head is None else list(self.value_head.named_parameters(prefix="value_head"))
        return super().trainable_named_parameters() + head

    def optimizer_param_groups(self):
        """With ``value_learning_rate``: the policy's groups and the value head's, at that rate."""
        if self.value_head is None or self.args.value_learning_rate is None:
            return super().optimizer_param_groups()
        policy = (p for _, p in super().trainable_named_parameters())
        return weight_decay_groups(policy, self.args.weight_decay) + [
            {"params": list(self.value_head.parameters()), "weight_decay": 0.0, "lr": self.args.value_learning_rate}]

    def compute_loss(self, batch):
        a = self.args
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        hidden = self._completion_hidden(self.model, batch)
        head = lm_head(self.model)
        h, w, b = head.inputs(hidden, dtype=self.compute_dtype)
        kl = {}
        if self.use_ref and a.use_kl_loss and a.divergence is not None:
            ref, ctx = self._reference()
            with torch.no_grad(), ctx:
                rh, rw, rb = lm_head(ref).inputs(self._completion_hidden(ref, batch), dtype=self.compute_dtype)
            kl = dict(ref_hidden=rh, ref_weight=rw, ref_bias=rb, divergence=a.divergence, kl_coef=a.kl_coef)
        elif self.use_ref and a.use_kl_loss:
            kl = dict(ref_logp=batch["ref_logp"], kl_coef=a.kl_coef, kl_estimator=a.kl_estimator)
        out = linear_ppo_loss(h, w, labels, batch.get("old_logp"), batch["advantages"], mask, bias=b,
                              softcap=head.softcap, temperature=a.temperature, clip_low=a.cliprange,
                              clip_high=a.cliprange_high, entropy_coef=a.entropy_coef, loss_agg=a.loss_agg, **kl)
        if "old_logp" not in batch and torch.is_grad_enabled():
            self._buffer["batch"]["old_logp"][batch["index"]] = out.metrics["logp"]
        metrics = {k: v for k, v in out.metrics.items() if k != "logp"}
        metrics["policy_loss"] = out.loss.detach()
        loss = out.loss
        if self.value_head is not None:
            values = self.value_head(hidden.detach().float()).squeeze(-1)
            v = value_loss(values, batch["values"], batch["returns"], mask, clip=a.cliprange_value,
                           loss_agg=a.loss_agg)
            loss = loss + a.vf_coef * v.loss
            metrics.update(v.metrics, value_loss=v.loss.detach())
        return loss, metrics

    # ---- evaluation and saving -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict:
        """Greedy completions of the eval prompts: mean ``reward`` and ``completions/mean_length`` (averaged
        over all ranks' shards)."""
        chunks, _ = self.eval_batches(eval_dataset)
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for chunk in chunks:
            with self.autocast():
                completions = generate_completions(self.model, self.processing_class,
                                                   [e["prompt_ids"] for e in chunk],
                                                   max_new_tokens=self.args.max_completion_length, do_sample=False)
            batch = self.to_device(left_pad([e["prompt_ids"] for e in chunk], completions, pad_id=self.pad_id,
                                            length=max(len(c) for c in completions)))
            scores = self._scores(chunk, completions, batch).nan_to_num(0.0)
            sums += torch.tensor([float(scores.sum()), sum(map(len, completions)), len(chunk)], dtype=torch.float64)
        self.model.train(was_training)
        sums = self._all_sum(sums)
        return {"reward": float(sums[0] / sums[2]), "completions/mean_length": float(sums[1] / sums[2])}

    def save_model(self, path=None) -> None:
        """The model and tokenizer (``BaseTrainer.save_model``) and, with GAE, ``value_head.safetensors``."""
        super().save_model(path)
        if self.value_head is not None and self.is_main:
            from safetensors.torch import save_file

            save_file({n: p.detach().cpu() for n, p in self.value_head.named_parameters()},
                      str(Path(path or self.output_dir) / "value_head.safetensors"))
