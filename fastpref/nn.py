"""torch.nn.Module wrappers of the losses: keyword configuration in ``__init__``, tensors in ``forward``."""
from __future__ import annotations

import torch

from fastpref.ops.linear_policy import linear_ppo_loss
from fastpref.ops.linear_preference import linear_dpo_loss
from fastpref.ops.policy import ppo_loss, value_loss
from fastpref.ops.preference import bt_loss, dpo_loss


class DPOLoss(torch.nn.Module):
    """``dpo_loss`` as a module: ``DPOLoss(beta=0.1, loss_type="sigmoid", ...)(chosen_logps, rejected_logps,
    ref_chosen_logps, ref_rejected_logps, chosen_lengths=None, rejected_lengths=None)`` -> PreferenceOutput."""

    def __init__(self, *, beta=0.1, loss_type="sigmoid", divergence="reverse_kl", label_smoothing=0.0,
                 reduction="mean", **params):
        super().__init__()
        self.config = dict(beta=beta, loss_type=loss_type, divergence=divergence, label_smoothing=label_smoothing,
                           reduction=reduction, **params)

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                chosen_lengths=None, rejected_lengths=None):
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **self.config)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class BTLoss(torch.nn.Module):
    """``bt_loss`` as a module: ``BTLoss(center_coef=0.01)(chosen_rewards, rejected_rewards, margin=None)``."""

    def __init__(self, *, center_coef=0.0, reduction="mean", backend="auto"):
        super().__init__()
        self.center_coef, self.reduction, self.backend = center_coef, reduction, backend

    def forward(self, chosen_rewards, rejected_rewards, margin=None):
        return bt_loss(chosen_rewards, rejected_rewards, margin=margin, center_coef=self.center_coef,
                       reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"center_coef={self.center_coef!r}, reduction={self.reduction!r}, backend={self.backend!r}"


class LinearDPOLoss(torch.nn.Module):
    """``linear_dpo_loss`` as a module: ``LinearDPOLoss(beta=0.1, loss_type="sigmoid", ...)(hidden, weight,
    labels, bias=None, ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=None, ref_weight=None,
    ref_bias=None)`` -> PreferenceOutput."""

    def __init__(self, *, beta=0.1, loss_type="sigmoid", divergence="reverse_kl", label_smoothing=0.0,
                 nll_coef=0.0, reduction="mean", ignore_index=-100, chunk_size=None, backend="auto", **params):
        super().__init__()
        self.config = dict(beta=beta, loss_type=loss_type, divergence=divergence, label_smoothing=label_smoothing,
                           nll_coef=nll_coef, reduction=reduction, ignore_index=ignore_index, chunk_size=chunk_size,
                           backend=backend, **params)

    def forward(self, hidden, weight, labels, *, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
                ref_hidden=None, ref_weight=None, ref_bias=None):
        return linear_dpo_loss(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen_logps,
                               ref_rejected_logps=ref_rejected_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
                               ref_bias=ref_bias, **self.config)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class PPOLoss(torch.nn.Module):
    """``ppo_loss`` as a module: ``PPOLoss(clip_low=0.2, loss_agg="seq-mean-token-mean", ...)(logp, old_logp,
    advantages, mask, ref_logp=None, kl=None, entropy=None, num_items=None)`` -> PolicyOutput."""

    def __init__(self, *, clip_low=0.2, clip_high=None, dual_clip=None, importance="token", kl_coef=0.0,
                 kl_estimator="k3", entropy_coef=0.0, loss_agg="token-mean"):
        super().__init__()
        self.config = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, importance=importance,
                           kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg)

    def forward(self, logp, old_logp, advantages, mask, *, ref_logp=None, kl=None, entropy=None, num_items=None):
        return ppo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, kl=kl, entropy=entropy,
                        num_items=num_items, **self.config)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class LinearPPOLoss(torch.nn.Module):
    """``linear_ppo_loss`` as a module: ``LinearPPOLoss(clip_low=0.2, ...)(hidden, weight, labels, old_logp,
    advantages, mask=None, bias=None, ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    num_items=None)`` -> PolicyOutput."""

    def __init__(self, *, clip_low=0.2, clip_high=None, dual_clip=None, importance="token", divergence=None,
                 kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, compute_entropy=True, loss_agg="token-mean",
                 ignore_index=-100, temperature=1.0, softcap=None, chunk_size=None, backend="auto", **params):
        super().__init__()
        self.config = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, importance=importance,
                           divergence=divergence, kl_coef=kl_coef, kl_estimator=kl_estimator,
                           entropy_coef=entropy_coef, compute_entropy=compute_entropy, loss_agg=loss_agg,
                           ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                           chunk_size=chunk_size, backend=backend, **params)

    def forward(self, hidden, weight, labels, old_logp, advantages, mask=None, *, bias=None, ref_logp=None,
                ref_hidden=None, ref_weight=None, ref_bias=None, num_items=None):
        return linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp,
                               ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, num_items=num_items,
                               **self.config)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class ValueLoss(torch.nn.Module):
    """``value_loss`` as a module: ``ValueLoss(clip=0.2)(values, old_values, returns, mask)``."""

    def __init__(self, *, clip=0.2, loss_agg="token-mean"):
        super().__init__()
        self.clip, self.loss_agg = clip, loss_agg

    def forward(self, values, old_values, returns, mask, *, num_items=None):
        return value_loss(values, old_values, returns, mask, clip=self.clip, loss_agg=self.loss_agg,
                          num_items=num_items)

    def extra_repr(self):
        return f"clip={self.clip!r}, loss_agg={self.loss_agg!r}"
