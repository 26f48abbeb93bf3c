"""Reward modelling: Bradley-Terry on the scalar head of a sequence classifier, pooled at the last token."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fastpref.integrations.transformers import last_hidden_states, score_head, unwrap
from fastpref.ops.preference import bt_loss
from fastpref.trainers.common import BaseTrainer, TrainerConfig, disable_dropout
from fastpref.trainers.data import DataConfig, Encoder, collate_pairs, load_records, pad_token_id, preference_examples


def sequence_rewards(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    """[n] fp32 rewards of a sequence classifier: its scalar head at each sequence's last attended position
    that is not the config's pad id (any padding side). That is where transformers' ``*ForSequenceClassification``
    (and so TRL, and whoever loads the saved model) pools; where pad is EOS it is the token before the EOS.
    ``kwargs`` go to the decoder (e.g. the ``position_ids`` of left-padded prompts)."""
    hidden = last_hidden_states(model, input_ids, attention_mask, **kwargs)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    keep = attention_mask.bool()
    pad_id = unwrap(model).config.pad_token_id
    if pad_id is not None:
        keep = keep & (input_ids != pad_id)
    last = (keep * positions).argmax(1)
    pooled = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]
    return score_head(model)(pooled).squeeze(-1).float()


@dataclass
class RewardConfig(TrainerConfig, DataConfig):
    """TRL's RewardConfig defaults: learning_rate 1e-4, max_length 1024, dropout disabled.

    ``center_rewards_coefficient``: weight of the (r_w + r_l)^2 centering term (None: off). A ``margin``
    column in the data is subtracted inside the sigmoid (Llama 2's margin loss)."""

    learning_rate: float = 1e-4
    center_rewards_coefficient: float | None = None
    disable_dropout: bool = True


class RewardTrainer(BaseTrainer):
    """``model``: a sequence classifier with ``num_labels=1`` (e.g. ``AutoModelForSequenceClassification``),
    plain or PEFT. The reward of a sequence is the scalar head applied to the decoder's hidden state at its
    last non-pad token (the head runs on B rows, not B x T); loss ``fastpref.bt_loss``.

    Sequences (prompt + response) longer than ``max_length`` are dropped with a warning, as TRL does: a cut
    response would be scored on a part of it. Metrics: ``accuracy``, ``margin``, ``rewards/chosen``,
    ``rewards/rejected``."""

    config_class = RewardConfig
    cli_models = {"model": "sequence_classification"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        score_head(self.model)  # fails early, with what to fix, for a model without a scalar head
        if self.args.disable_dropout:
            disable_dropout(self.model)

    def prepare_dataset(self, data, *, split):
        records = load_records(data, split=split)
        enc = Encoder(self.processing_class, use_chat_template=self.args.use_chat_template)
        examples = preference_examples(records, enc, split=split, prompt_required=False)
        limit = self.args.max_length
        if limit is None:
            return examples
        kept = [e for e in examples
                if len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= limit]
        if not kept:
            raise ValueError(f"{split}_dataset: every example is longer than max_length={limit} tokens; raise "
                             "max_length")
        if len(kept) < len(examples):
            warnings.warn(f"{split}_dataset: dropped {len(examples) - len(kept)} of {len(examples)} examples "
                          f"longer than max_length={limit}", stacklevel=2)
        return kept

    def collate(self, examples):
        return collate_pairs(examples, pad_id=pad_token_id(self.processing_class))

    def rewards(self, input_ids, attention_mask):
        """``sequence_rewards`` of the model being trained, under the trainer's autocast."""
        with self.autocast():
            return sequence_rewards(self.model, input_ids, attention_mask)

    def compute_loss(self, batch):
        r = self.rewards(batch["input_ids"], batch["attention_mask"])
        B = r.shape[0] // 2
        out = bt_loss(r[:B], r[B:], margin=batch.get("margin"), center_coef=self.args.center_rewards_coefficient or 0.0)
        return out.loss, {**out.metrics, "rewards/chosen": out.chosen_rewards.mean(),
                          "rewards/rejected": out.rejected_rewards.mean()}
