"""Supervised fine-tuning: token-mean negative log-likelihood from the fused log-probs (no logits)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.integrations.transformers import last_hidden_states, lm_head
from fastpref.trainers.common import BaseTrainer, TrainerConfig
from fastpref.trainers.data import (IGNORE_INDEX, DataConfig, Encoder, check_columns, load_records, pad_sequences,
                                   pad_token_id)


@dataclass
class SFTConfig(TrainerConfig, DataConfig):
    """TRL's SFTConfig defaults: learning_rate 2e-5, max_length 1024 (keep the start).

    ``completion_only_loss``: None = True for prompt/completion data (the prompt is masked), as in TRL;
    ``text`` and ``messages`` data train on every token. ``dataset_text_field``: the text column."""

    learning_rate: float = 2e-5
    completion_only_loss: bool | None = None
    dataset_text_field: str = "text"


class SFTTrainer(BaseTrainer):
    """``loss = -sum(log p(token)) / #tokens`` over the trained tokens of the whole optimizer step (all
    micro-batches and ranks: the token mean of the big batch, as transformers computes it since 4.46), from
    ``linear_logprobs`` on the decoder's hidden states and the LM head. Also logs ``entropy`` (token mean;
    TRL's ``mean_token_accuracy`` needs the argmax of the logits, which are never computed)."""

    config_class = SFTConfig

    def prepare_dataset(self, data, *, split):
        records = load_records(data, split=split)
        text = self.args.dataset_text_field
        cols = check_columns(records, [(text,), ("prompt", "completion"), ("messages",)], split=split, kind="SFT")
        enc = Encoder(self.processing_class, use_chat_template=self.args.use_chat_template,
                      max_length=self.args.max_length)
        if len(cols) == 1:
            return [{"prompt_ids": [], "completion_ids": enc.text(r[cols[0]])} for r in records]
        masked = self.args.completion_only_loss is not False
        examples = []
        for i, r in enumerate(records):
            p, c = enc.pair(r["prompt"], r["completion"], where=f"{split}_dataset[{i}]")
            examples.append({"prompt_ids": p if masked else [], "completion_ids": c if masked else p + c})
        return examples

    def collate(self, examples):
        return pad_sequences([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                             pad_id=pad_token_id(self.processing_class))

    def micro_batch_weights(self, micro_batches):
        # Each micro-batch's loss is its token mean: weighting by its share of the step's tokens (summed
        # over ranks, whose gradients are then averaged) makes the step's loss the token mean of all.
        counts = torch.tensor([float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches])
        total = float(self._all_sum(counts.sum().reshape(1)).item())
        return (counts * self.world_size / max(total, 1.0)).tolist()

    def compute_loss(self, batch):
        with self.autocast():
            hidden = last_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        logp, entropy = lm_head(self.model).logprobs(hidden[:, :-1], labels, dtype=self.compute_dtype,
                                                     return_entropy=True)
        n = (labels != IGNORE_INDEX).sum()
        loss = -logp.sum() / n.clamp(min=1)
        return loss, {"entropy": entropy.detach().sum() / n.clamp(min=1)}
