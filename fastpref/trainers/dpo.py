"""Direct preference optimization with ``fastpref.linear_dpo_loss``: the policy's sequence log-probs and
the loss in one fused call on the decoder's hidden states, never the logits."""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fastpref.integrations.transformers import last_hidden_states, lm_head
from fastpref.ops.linear_preference import linear_dpo_loss
from fastpref.ops.preference import LOSS_TYPES, REFERENCE_FREE, dpo_loss
from fastpref.trainers.common import BaseTrainer, TrainerConfig, disable_dropout
from fastpref.trainers.data import (IGNORE_INDEX, DataConfig, Encoder, collate_pairs, load_records, pad_token_id,
                                    preference_examples)

# TRL's f_divergence_type names -> fastpref.divergences names
_DIVERGENCES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js_divergence": "js",
                "alpha_divergence": "alpha", "js": "js", "alpha": "alpha"}


@dataclass
class DPOConfig(TrainerConfig, DataConfig):
    """TRL's DPOConfig names and defaults (learning_rate 1e-6, beta 0.1, max_length 1024, dropout
    disabled), ``loss_type`` any of ``fastpref.dpo_loss``'s (one type; TRL's lists of weighted types are
    not supported).

    ``f_divergence_type`` (reverse_kl, forward_kl, js_divergence, alpha_divergence) with
    ``f_alpha_divergence_coef``; ``simpo_gamma`` and ``discopop_tau`` for those types; ``rpo_alpha`` adds
    RPO's NLL of the chosen completions. ``max_prompt_length`` (fastpref; None: off) keeps the last tokens
    of longer prompts. ``precompute_ref_log_probs``: one pass over the data with the reference before
    training; the values are kept with the examples and in checkpoints."""

    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float | None = None
    max_prompt_length: int | None = None
    precompute_ref_log_probs: bool = False
    disable_dropout: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is unknown; use one of {list(LOSS_TYPES)}")
        if self.f_divergence_type not in _DIVERGENCES:
            raise ValueError(f"f_divergence_type {self.f_divergence_type!r} is unknown; use one of "
                             f"{list(_DIVERGENCES)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")

    def loss_kwargs(self) -> dict:
        """Keyword arguments of ``dpo_loss`` / ``linear_dpo_loss`` for this config."""
        kw = dict(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                  divergence=_DIVERGENCES[self.f_divergence_type])
        if kw["divergence"] == "alpha":
            kw["alpha"] = self.f_alpha_divergence_coef
        if self.loss_type == "simpo":
            kw["gamma"] = self.simpo_gamma
        if self.loss_type == "discopop":
            kw["tau"] = self.discopop_tau
        return kw


class DPOTrainer(BaseTrainer):
    """TRL-shaped DPO. The reference policy is, in this order:

    - ``ref_model`` when given (frozen: eval mode, no gradients);
    - the model with its adapters disabled, for a PEFT model and ``ref_model=None``;
    - with ``precompute_ref_log_probs=True``: the model itself, before training (no copy is kept; an
      example seen only after training started then has no reference and is an error);
    - otherwise a frozen deep copy of the model (TRL's ``create_reference_model``).

    Reference log-probs come from ``linear_logprobs`` under no_grad; the reference-free types (simpo,
    orpo) compute none. Models with a final-logit softcap (Gemma 2) take ``linear_logprobs`` + ``dpo_loss``
    (4 matmuls per token instead of 3, still no [N, V] logits), since ``linear_dpo_loss`` has no softcap.
    Metrics: TRL's ``rewards/*`` and ``logps/*``.
    """

    config_class = DPOConfig
    cli_models = {"model": "causal_lm", "ref_model": "causal_lm"}

    def __init__(self, model, ref_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, optimizers=(None, None)):
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, optimizers)
        a = self.args
        self.reference_free = a.loss_type in REFERENCE_FREE
        self.peft = hasattr(model, "disable_adapter")
        if ref_model is not None:
            self.broadcast_module(ref_model.to(self.device))
        elif not (self.peft or a.precompute_ref_log_probs or self.reference_free):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.ref_model = None if self.reference_free else ref_model
        if a.disable_dropout:
            for m in (model, self.ref_model):
                if m is not None:
                    disable_dropout(m)
        self._policy_changed = False

    def prepare_dataset(self, data, *, split):
        records = load_records(data, split=split)
        enc = Encoder(self.processing_class, use_chat_template=self.args.use_chat_template,
                      max_length=self.args.max_length, max_prompt_length=self.args.max_prompt_length)
        return preference_examples(records, enc, split=split, prompt_required=True)

    def collate(self, examples):
        batch = collate_pairs(examples, pad_id=pad_token_id(self.processing_class))
        if all("ref_logps" in e for e in examples):
            ref = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    @torch.no_grad()
    def reference_logps(self, batch) -> torch.Tensor:
        """[2B] fp32 sequence log-probs of the batch's completions under the reference policy."""
        model, ctx = self.ref_model, nullcontext()
        if model is None:
            model = self.model
            if self.peft:
                ctx = model.disable_adapter()
            elif self._policy_changed:
                raise RuntimeError("precompute_ref_log_probs=True without a ref_model uses the initial policy "
                                   "as the reference, and these examples were not precomputed before training "
                                   "(a new eval_dataset?): pass ref_model=..., or evaluate on the trainer's "
                                   "eval_dataset")
        with ctx:
            with self.autocast():
                hidden = last_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            logp = lm_head(model).logprobs(hidden[:, :-1], batch["labels"][:, 1:], dtype=self.compute_dtype)
        return logp.sum(-1)

    def on_train_begin(self):
        if self.args.precompute_ref_log_probs and not self.reference_free:
            for examples in (self.train_examples, self.eval_examples):
                if examples and "ref_logps" not in examples[0]:
                    self._precompute(examples)
        self._policy_changed = True

    def _precompute(self, examples) -> None:
        """One pass with the reference over ``examples`` (sharded over ranks, then summed)."""
        values = torch.zeros(len(examples), 2, dtype=torch.float64)
        idx, bs = self._shard(len(examples), epoch=None), self.args.per_device_eval_batch_size
        was_training = self.model.training
        self.model.eval()
        for s in range(0, len(idx), bs):
            rows = idx[s:s + bs]
            ref = self.reference_logps(self.to_device(self.collate([examples[i] for i in rows]))).double().cpu()
            values[rows] = torch.stack([ref[:len(rows)], ref[len(rows):]], 1)
        self.model.train(was_training)
        for e, v in zip(examples, self._all_sum(values).cpu().tolist()):
            e["ref_logps"] = v

    def extra_state(self):
        if not self.args.precompute_ref_log_probs:
            return None
        return {split: [e.get("ref_logps") for e in examples or []]
                for split, examples in (("train", self.train_examples), ("eval", self.eval_examples))}

    def load_extra_state(self, state):
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            saved = state.get(split) or []
            if examples and len(saved) == len(examples) and all(v is not None for v in saved):
                for e, v in zip(examples, saved):
                    e["ref_logps"] = v

    def compute_loss(self, batch):
        labels = batch["labels"][:, 1:]
        with self.autocast():
            hidden = last_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])[:, :-1]
        B = labels.shape[0] // 2
        ref = {}
        if not self.reference_free:
            ref_logps = batch["ref_logps"] if "ref_logps" in batch else self.reference_logps(batch)
            ref = {"ref_chosen_logps": ref_logps[:B], "ref_rejected_logps": ref_logps[B:]}
        head, kw, rpo = lm_head(self.model), self.args.loss_kwargs(), self.args.rpo_alpha or 0.0
        if head.softcap is None:
            h, w, b = head.inputs(hidden, dtype=self.compute_dtype)
            out = linear_dpo_loss(h, w, labels, bias=b, nll_coef=rpo, **ref, **kw)
            loss = out.loss
        else:
            logp = head.logprobs(hidden, labels, dtype=self.compute_dtype).sum(-1)
            lengths = (labels != IGNORE_INDEX).sum(1)
            out = dpo_loss(logp[:B], logp[B:], ref.get("ref_chosen_logps"), ref.get("ref_rejected_logps"),
                           chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], **kw)
            loss = out.loss - rpo * logp[:B].sum() / lengths[:B].sum().clamp(min=1)
        return loss, {k: v for k, v in out.metrics.items() if v.dim() == 0}
