"""TRL's DPOTrainer, RewardTrainer and GRPOTrainer with their losses computed by fastpref's fused ops.

Drop-in subclasses (same constructor, config classes and logged metric names as TRL)::

    from trl import DPOConfig
    from fastpref.integrations.trl import FastprefDPOTrainer

    trainer = FastprefDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()

or ``patch_trl()`` before ``from trl import DPOTrainer`` (e.g. in a script you do not want to edit).

Supported TRL: 1.16 (checked against 1.16.0). The subclasses override TRL's private ``_compute_loss`` (and
``compute_loss`` for the reward trainer), whose inputs and metrics follow TRL's release; other versions may
break.

Choices made where TRL and fastpref differ, or the issue is silent:

- The policy's hidden states come from the model's own ``forward`` (patched like TRL's fused LM head, so
  DDP, FSDP, DeepSpeed and PEFT see a normal forward call): ``model(..., fastpref_hidden_states=True)``
  returns the decoder's last hidden states, and the fused op reads the head's weight (plain or PEFT,
  softcap and logit scale from the config, ``integrations.transformers.lm_head``). Under mixed precision
  the head runs in the autocast dtype, as TRL's fused head does (GRPO's ``cast_lm_head_to_fp32``: fp32).
- The no-gradient passes stay TRL's: DPO's reference log-probs (``compute_ref_log_probs``: a separate
  ``ref_model``, the PEFT model with its adapter disabled or its "ref" adapter, or the precomputed column)
  and GRPO's old/reference log-probs run TRL's chunked fused head, which never holds [N, V] logits either.
- DPO: a single loss type (plus ``"sft"``, as fastpref's ``nll_coef``) runs ``linear_dpo_loss``; a list of
  several, ``ld_alpha`` or a softcapped head (Gemma 2/3) run ``linear_logprobs`` then ``dpo_loss`` per type.
  ``f_divergence_type`` maps to fastpref's ``divergence`` (js_divergence -> js, alpha_divergence -> alpha
  with ``f_alpha_divergence_coef``). fastpref drops the constants of f' (DESIGN.md): equal to TRL for every
  type except ipo and sigmoid_norm under a non-default divergence. ``label_smoothing`` also applies to
  ``sigmoid`` (conservative DPO; TRL 1.16 ignores it there). Not logged (they need the full logits):
  ``entropy``, ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``. Refused: ``use_weighting``
  (WPO needs sum_v p_v^2), MoE auxiliary losses, vision datasets.
- Reward: TRL's forward (the score head is [1, H]), ``fastpref.bt_loss`` with the margin column and
  ``center_rewards_coefficient``.
- GRPO: ``linear_ppo_loss`` for loss types grpo (``seq-mean-token-mean``), bnpo, dr_grpo, dapo (``token-mean``
  over TRL's normalizer) and luspo (``seq-mean-token-sum``); ``epsilon``/``epsilon_high`` the clips,
  ``delta`` the dual clip (the same loss when ``delta >= 1 + epsilon_high``), ``beta`` the k3 KL
  (``use_bias_correction_kl``: "k3+", k3's value with k2's gradient, which is TRL's corrected KL when the
  importance ratio is 1, so it is refused with ``num_iterations > 1``, ``steps_per_generation >
  gradient_accumulation_steps`` or sequence-level ratios), vLLM importance-sampling ratios folded into the
  advantages (they are >= 0). ``entropy_coef``: TRL's bonus (token mean of the entropy) for every type but
  grpo, whose per-sequence weights cannot carry it: there the bonus is averaged like the loss
  (sequence mean of token means) and ``policy_loss`` is not logged. Refused: cispo, sapo, vespo,
  ``use_adaptive_entropy``, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, MoE auxiliary
  losses, vision-language models.
"""
from __future__ import annotations

import functools
import types

import torch

try:
    import trl
except ModuleNotFoundError as e:
    raise ModuleNotFoundError("fastpref.integrations.trl needs TRL: pip install 'fastpref[trl]'", name="trl") from e
from trl.trainer.utils import nanmax, nanmin

from fastpref.integrations.transformers import last_hidden_states, lm_head, unwrap
from fastpref.ops.linear_policy import linear_ppo_loss
from fastpref.ops.linear_preference import linear_dpo_loss
from fastpref.ops.preference import REFERENCE_FREE, bt_loss, dpo_loss
from fastpref.ops.preference import LOSS_TYPES as _FASTPREF_DPO_TYPES

__all__ = ["FastprefDPOTrainer", "FastprefGRPOTrainer", "FastprefRewardTrainer", "patch_trl"]

DPO_LOSS_TYPES = tuple(t for t in _FASTPREF_DPO_TYPES if t not in REFERENCE_FREE) + ("sft",)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_DIVERGENCES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js_divergence": "js",
                "alpha_divergence": "alpha"}


def _add_hidden_states_forward(model):
    """Make ``model(..., fastpref_hidden_states=True)`` return the decoder's last hidden states [B, T, H].

    Patched on the transformers model (inside PEFT) like TRL's fused LM head, so that the call goes through
    every wrapper's forward (DDP synchronizes gradients only for calls through its forward)."""
    inner = unwrap(model)
    forward = inner.forward

    @functools.wraps(type(inner).forward)  # generate() checks its kwargs against this signature
    def hidden_forward(self, *args, fastpref_hidden_states=False, **kwargs):
        if not fastpref_hidden_states:
            return forward(*args, **kwargs)
        # PEFT's forward passes its own arguments on, mostly None; labels and use_cache are not the decoder's.
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("labels", "use_cache", "return_dict")}
        return last_hidden_states(self, *args, **kwargs)

    inner.forward = types.MethodType(hidden_forward, inner)


def _head_dtype(trainer):
    """The autocast dtype of mixed-precision training (TRL's fused head runs under it), else None (the
    weight's dtype)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.accelerator.mixed_precision)


def _refuse(options):
    """Raise for the first ``(condition, message)`` that holds."""
    for condition, message in options:
        if condition:
            raise NotImplementedError(f"fastpref's TRL integration: {message}")


def _global_mean(accelerator, total, count):
    """Sum of the processes' totals over the sum of their counts (TRL's global masked mean)."""
    totals = accelerator.reduce(torch.stack([total.float(), torch.as_tensor(count, device=total.device).float()]),
                                reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


class FastprefDPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` whose policy log-probs and loss come from ``linear_dpo_loss`` (module docstring)."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        if args is not None:
            self._check_config(args)
        super().__init__(model, ref_model, args, *rest, **kwargs)
        _refuse([(self._is_vision_dataset, "vision-language DPO is not supported"),
                 (self.aux_loss_enabled, "MoE auxiliary losses are not supported: set router_aux_loss_coef=0.0")])
        _add_hidden_states_forward(self.model)

    @staticmethod
    def _check_config(args):
        unknown = [t for t in args.loss_type if t not in DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type {unknown} not supported by fastpref; valid: {', '.join(DPO_LOSS_TYPES)}")
        if args.f_divergence_type not in _DIVERGENCES:
            raise ValueError(f"unknown f_divergence_type {args.f_divergence_type!r}; valid: {', '.join(_DIVERGENCES)}")
        if set(args.loss_type) <= {"sft"}:
            raise ValueError("loss_type needs a DPO type ('sft' alone is supervised fine-tuning: use SFTTrainer)")
        _refuse([(args.use_weighting, "use_weighting (WPO) needs sum_v p_v^2, which the fused ops do not compute")])

    def _dpo_options(self, loss_type):
        """fastpref keyword arguments for one TRL loss type (beta, smoothing, divergence and its parameter)."""
        opts = dict(beta=self.beta, label_smoothing=self.label_smoothing, loss_type=loss_type,
                    divergence=_DIVERGENCES[self.f_divergence_type])
        if opts["divergence"] == "alpha":
            if abs(self.f_alpha_divergence_coef - 1.0) < 1e-6:  # TRL's limit case: reverse KL
                opts["divergence"] = "reverse_kl"
            else:
                opts["alpha"] = self.f_alpha_divergence_coef
        if loss_type == "discopop":
            opts["tau"] = self.args.discopop_tau
        return opts

    def _policy_loss(self, head, hidden, labels, ref_chosen, ref_rejected):
        """(loss, PreferenceOutput of a DPO type, chosen sequence log-probs [B], rejected [B])."""
        pairs = list(zip(self.loss_types, self.loss_weights, strict=True))
        sft = sum(weight for loss_type, weight in pairs if loss_type == "sft")
        pairs = [(loss_type, weight) for loss_type, weight in pairs if loss_type != "sft"]
        dtype = _head_dtype(self)
        if len(pairs) == 1 and pairs[0][1] > 0 and self.ld_alpha is None and head.softcap is None:
            [(loss_type, weight)] = pairs
            h, w, b = head.inputs(hidden, dtype=dtype)
            out = linear_dpo_loss(h, w, labels, bias=b, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                                  nll_coef=sft / weight, **self._dpo_options(loss_type))
            return weight * out.loss, out, out.metrics["chosen_logps"], out.metrics["rejected_logps"]
        # Several types share one pass of per-token log-probs (4 matmuls per token instead of 3).
        per_token = head.logprobs(hidden, labels, dtype=dtype)
        mask = labels != -100
        chosen, rejected = (per_token * self._ld_weights(mask)).sum(1).chunk(2)
        lengths_w, lengths_l = mask.sum(1).chunk(2)
        B = chosen.shape[0]
        loss = -sft * per_token[:B][mask[:B]].mean() if sft else 0.0
        for loss_type, weight in pairs:
            out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=lengths_w,
                           rejected_lengths=lengths_l, **self._dpo_options(loss_type))
            loss = loss + weight * out.loss
        return loss, out, chosen, rejected

    def _ld_weights(self, mask):
        """Per-token weights of the sequence log-prob: 1, or LD-DPO's ``ld_alpha`` past the length the pair's
        two completions share (TRL's definition)."""
        if self.ld_alpha is None:
            return mask.float()
        position = mask.cumsum(1)
        shared = torch.minimum(*mask.sum(1).chunk(2)).repeat(2).unsqueeze(1)
        return ((position > 0) & (position <= shared)).float() + self.ld_alpha * (position > shared).float()

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"][:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
        hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       fastpref_hidden_states=True)[:, :-1]
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)
        head = lm_head(self.accelerator.unwrap_model(model))
        loss, out, chosen, rejected = self._policy_loss(head, hidden, labels, ref_chosen, ref_rejected)
        self._log_metrics(mode, inputs, out, chosen, rejected)
        if return_outputs:  # TRL's deprecated compute_metrics path: it recomputes the logits, as TRL does
            with torch.no_grad():
                return loss, model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return loss

    def _log_metrics(self, mode, inputs, out, chosen, rejected):
        metrics, gather = self._metrics[mode], self.accelerator.gather
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        rewards_w, rewards_l = gather(out.chosen_rewards), gather(out.rejected_rewards)
        metrics["rewards/chosen"].append(rewards_w.mean().item())
        metrics["rewards/rejected"].append(rewards_l.mean().item())
        metrics["rewards/accuracies"].append((rewards_w > rewards_l).float().mean().item())
        metrics["rewards/margins"].append((rewards_w - rewards_l).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())


class FastprefRewardTrainer(trl.RewardTrainer):
    """``trl.RewardTrainer`` whose Bradley-Terry loss (margin, reward centering) is ``fastpref.bt_loss``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(**{k: v for k, v in inputs.items() if k != "margin"}, use_cache=False)
        rewards_w, rewards_l = outputs.logits.squeeze(-1).chunk(2)
        out = bt_loss(rewards_w, rewards_l, margin=inputs.get("margin"),
                      center_coef=self.args.center_rewards_coefficient or 0.0)
        metrics = self._metrics[mode]
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        rewards = self.accelerator.gather(outputs.logits.detach())
        metrics["min_reward"].append(rewards.min().item())
        metrics["mean_reward"].append(rewards.mean().item())
        metrics["max_reward"].append(rewards.max().item())
        for name in ("accuracy", "margin"):
            metrics[name].append(self.accelerator.gather_for_metrics(out.metrics[name]).mean().item())
        return (out.loss, outputs) if return_outputs else out.loss


class FastprefGRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss is ``linear_ppo_loss`` (module docstring)."""

    def __init__(self, model, reward_funcs=None, args=None, *rest, **kwargs):
        if args is not None:
            self._check_config(args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        _refuse([(self._is_vlm, "vision-language GRPO is not supported"),
                 (self.aux_loss_enabled, "MoE auxiliary losses are not supported: set router_aux_loss_coef=0.0")])
        _add_hidden_states_forward(self.model)

    @staticmethod
    def _check_config(args):
        if args.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type={args.loss_type!r} not supported by fastpref; valid: "
                             f"{', '.join(GRPO_LOSS_TYPES)}")
        high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        ratio_is_one = (args.num_iterations == 1 and args.steps_per_generation <= args.gradient_accumulation_steps
                        and args.importance_sampling_level == "token")
        _refuse([
            (args.use_adaptive_entropy, "use_adaptive_entropy is not supported"),
            (args.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 is not supported"),
            (args.off_policy_mask_threshold is not None, "off_policy_mask_threshold is not supported"),
            (args.delta is not None and args.delta < 1 + high,
             "delta < 1 + epsilon_high is not a dual clip; use delta >= 1 + epsilon_high"),
            (args.beta != 0.0 and args.use_bias_correction_kl and not ratio_is_one,
             "use_bias_correction_kl weights the KL by an importance ratio that is not 1 here "
             "(num_iterations > 1, steps_per_generation > gradient_accumulation_steps or sequence-level "
             "ratios): set use_bias_correction_kl=False"),
        ])

    def _aggregation(self, mode, accumulation, mask, inputs):
        """(fastpref loss_agg, num_items) that give TRL's normalization of ``self.loss_type``, with
        ``accumulation`` the gradient accumulation steps it divides by."""
        B = mask.shape[0]
        if self.loss_type == "grpo":
            return "seq-mean-token-mean", B * accumulation
        if self.loss_type == "luspo":
            return "seq-mean-token-sum", B * accumulation
        if self.loss_type == "bnpo":
            return "token-mean", max(mask.sum().item(), 1.0) * accumulation
        if self.loss_type == "dr_grpo":
            return "token-mean", B * self.max_completion_length * accumulation
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0).item() / self.accelerator.num_processes  # dapo
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return "token-mean", normalizer

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        length = completion_ids.shape[1]
        with self.accelerator.autocast():  # as TRL's policy forward
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, fastpref_hidden_states=True)
        hidden = hidden[:, -length - 1:-1]
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        scaled = advantages
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the clipped surrogate by the ratio rho >= 0: the same as advantages * rho.
            scaled = advantages * inputs["importance_sampling_ratio"]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1  # eval: no accumulation
        loss_agg, num_items = self._aggregation(mode, accumulation, mask, inputs)
        tokens = max(mask.sum().item(), 1.0)
        # TRL's bonus is coef x (token mean of the entropy) / GA; a loss whose token weights are one constant
        # (all but grpo) carries it with the coefficient rescaled to that constant.
        entropy_scale = 1.0 if loss_agg == "seq-mean-token-mean" else num_items / (tokens * accumulation)
        head = lm_head(self.accelerator.unwrap_model(model))
        dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else _head_dtype(self)
        h, w, b = head.inputs(hidden, dtype=dtype)
        out = linear_ppo_loss(
            h, w, completion_ids.masked_fill(mask == 0, -100), inputs.get("old_per_token_logps"),
            scaled.expand(mask.shape).contiguous(), mask.bool(), bias=b, temperature=self.temperature,
            softcap=head.softcap, clip_low=self.epsilon_low, clip_high=self.epsilon_high, dual_clip=self.args.delta,
            importance=self.importance_sampling_level,
            ref_logp=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, kl_coef=self.beta,
            kl_estimator="k3+" if self.args.use_bias_correction_kl else "k3",
            entropy_coef=self.entropy_coef * entropy_scale, loss_agg=loss_agg, num_items=num_items)
        self._log_metrics(mode, inputs, out, mask, advantages, accumulation)
        return out.loss

    def _log_metrics(self, mode, inputs, out, mask, advantages, accumulation):
        """TRL's metrics of ``_compute_loss``, from fastpref's per-token log-probs and token means."""
        metrics, acc = self._metrics[mode], self.accelerator
        if self._entropy_bonus_enabled and self.loss_type != "grpo":  # grpo's bonus is not TRL's (docstring)
            bonus = self.entropy_coef * out.metrics["entropy"] / accumulation
            policy_loss = (out.loss.detach() + bonus) * (1 if self.loss_type == "dapo" else accumulation)
            metrics["policy_loss"].append(acc.gather(policy_loss).nanmean().item())
        if self._entropy_bonus_enabled and mode == "train" and acc.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
        count = mask.sum()
        if self.beta != 0.0:
            metrics["kl"].append(_global_mean(acc, out.metrics["kl"] * count, count))
        metrics["entropy"].append(_global_mean(acc, out.metrics["entropy"] * count, count))
        # TRL's clip metrics, from the log-probs the fused op computed.
        logp = out.metrics["logp"]
        old = inputs.get("old_per_token_logps")
        log_ratio = logp - (logp if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()

        def masked_mean(x):  # x holds one value per sequence ([B, 1]) or per token
            total, n = (x.sum(), x.shape[0]) if x.shape[1] == 1 else ((x * mask).sum(), count)
            return _global_mean(acc, total, n)

        def sequence_means(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        metrics["clip_ratio/low_mean"].append(masked_mean(low))
        metrics["clip_ratio/high_mean"].append(masked_mean(high))
        metrics["clip_ratio/region_mean"].append(masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(acc.gather(sequence_means(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(acc.gather(sequence_means(high))).item())


def patch_trl():
    """Make ``trl.DPOTrainer``, ``trl.RewardTrainer`` and ``trl.GRPOTrainer`` the fastpref subclasses, for code
    that looks them up on ``trl`` after this call (``from trl import DPOTrainer`` included); names imported
    before it keep TRL's classes. Idempotent."""
    for name, cls in (("DPOTrainer", FastprefDPOTrainer), ("RewardTrainer", FastprefRewardTrainer),
                      ("GRPOTrainer", FastprefGRPOTrainer)):
        setattr(trl, name, cls)
