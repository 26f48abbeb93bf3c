"""The decoder and output head of a transformers model, for fastpref's fused ops (no [N, V] logits).

A causal LM computes ``logits = head(decoder(input_ids))``. fastpref's ops take the decoder's last hidden
states and the head's parameters instead, so this module splits a model into the two::

    from fastpref.integrations.transformers import last_hidden_states, lm_head

    head = lm_head(model)                                   # Head(weight, bias, softcap, scale)
    hidden = last_hidden_states(model, input_ids, attention_mask)[:, :-1]
    logp = head.logprobs(hidden, labels)                   # linear_logprobs with the model's head math
    # or, for the ops without softcap (linear_dpo_loss): h, w, b = head.inputs(hidden)

Choices:

- PEFT: a ``PeftModel`` is unwrapped with ``get_base_model()``; its LoRA layers stay injected in the base
  model, so the decoder's hidden states include the adapters and ``with model.disable_adapter():`` turns
  them off (the reference policy of a LoRA run). Prompt-learning PEFT methods (prefix/prompt tuning) work
  through ``PeftModel.forward`` only and are not supported. A LoRA adapter *on the output head* is
  rejected: its weight alone would silently drop the adapter (use ``modules_to_save=["lm_head"]``).
- The decoder is ``get_decoder()`` of the unwrapped model (``model.model`` for Llama-likes; ``base_model``
  where older transformers lack it), called with ``use_cache=False`` and without ``output_hidden_states``
  (no copy of every layer's states).
- Head math from the (text) config: ``final_logit_softcapping`` (Gemma 2/3: ``c * tanh(logits / c)``),
  ``logit_scale`` (Cohere: ``logits * s``) and ``logits_scaling`` (Granite: ``logits / s``, kept as the
  scale ``1 / s``; HyperCLOVAX: ``logits * s``). Tied embeddings need nothing special: the head's weight
  *is* the embedding matrix (with PEFT's ``trainable_token_indices``, the one with the trained rows).
- Reward models: ``score_head(model)`` is the scalar head of a sequence classifier (``num_labels=1``),
  applied by the caller to the hidden state of the last non-pad token (TRL's pooling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.ops.logprobs import linear_logprobs

__all__ = ["Head", "decoder", "last_hidden_states", "lm_head", "score_head", "unwrap"]


@dataclass(frozen=True)
class Head:
    """A model's output head: ``logits = softcap(scale * (hidden @ weight.T + bias))``.

    ``softcap`` None means no capping, ``scale`` None means 1. ``weight`` is the live parameter (gradients
    reach it, tied or not)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    scale: float | None = None

    def inputs(self, hidden, *, dtype=None):
        """``(hidden, weight, bias)`` ready for a fused op: cast to ``dtype`` (default: the weight's; pass
        torch.bfloat16 for bf16 kernels under autocast), with ``scale`` folded into hidden and bias
        (``s (h W^T + b) = (s h) W^T + s b``, exact, one [N, H] multiply). The softcap is not folded: pass
        ``softcap=head.softcap`` to ops that take it, or use ``logprobs``."""
        dtype = dtype or self.weight.dtype
        weight = self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        hidden = hidden.to(dtype)
        if self.scale is not None and self.scale != 1.0:
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale
        return hidden, weight, bias

    def logprobs(self, hidden, labels, *, dtype=None, **kwargs):
        """``fastpref.linear_logprobs`` under this head (``kwargs``: temperature, return_entropy, ...)."""
        h, w, b = self.inputs(hidden, dtype=dtype)
        return linear_logprobs(h, w, labels, bias=b, softcap=self.softcap, **kwargs)


def unwrap(model):
    """The transformers model inside a PEFT ``PeftModel`` (adapters still injected), or ``model``."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        raise TypeError("prompt-learning PEFT models (prefix/prompt tuning) are not supported: they act through "
                        "PeftModel.forward only; use an adapter method such as LoRA")
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder(model):
    """The module that maps input ids to the last hidden states (``get_decoder()`` of the unwrapped
    model: ``LlamaModel`` inside ``LlamaForCausalLM`` or ``LlamaForSequenceClassification``)."""
    inner = unwrap(model)
    get = getattr(inner, "get_decoder", None)
    if callable(get):
        return get()
    # transformers before ~4.50 had get_decoder on causal LMs only; base_model is the decoder elsewhere.
    base = getattr(inner, "base_model", None)
    if base is None or base is inner:
        raise TypeError(f"{type(inner).__name__} has no get_decoder() or base_model: pass a transformers model")
    return base


def last_hidden_states(model, input_ids, attention_mask=None, **kwargs):
    """The decoder's last hidden states [B, T, H] (after the final norm, what the head reads).

    ``kwargs`` go to the decoder (e.g. ``position_ids``); ``use_cache`` is off (training, no generation)."""
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_head(model) -> Head:
    """The output head of a causal LM (plain or PEFT-wrapped) as a ``Head``.

    Raises a TypeError for a model without output embeddings (e.g. a sequence classifier) or with a LoRA
    adapter on the head."""
    inner = unwrap(model)
    module = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if module is None:
        raise TypeError(f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None): "
                        "pass a causal LM such as AutoModelForCausalLM")
    if hasattr(module, "lora_A"):
        raise TypeError("a LoRA adapter on the output head is not supported (its weight alone drops the "
                        "adapter): leave lm_head out of target_modules, or use modules_to_save=['lm_head']")
    # ModulesToSaveWrapper (PEFT) holds a trainable copy per adapter; the active one is the head in use.
    active = getattr(module, "modules_to_save", None)
    tokens = getattr(module, "token_adapter", None)
    if tokens is not None:
        # TrainableTokensWrapper (PEFT ``trainable_token_indices`` on a model with tied embeddings wraps the
        # head too): the head in use is the base weight with the trained rows swapped in, as its forward
        # computes it (F.linear without bias); the base weight alone would silently drop those rows.
        if tokens.disable_adapters or not tokens.active_adapters:
            weight, bias = tokens.base_layer.weight, getattr(tokens.base_layer, "bias", None)
        else:
            weight, bias = tokens.get_merged_weights(tokens.active_adapters), None
    else:
        if active is not None and getattr(module, "active_adapter", None) in active and not module.disable_adapters:
            module = active[module.active_adapter]
        elif hasattr(module, "original_module"):
            module = module.original_module
        weight = module.weight
        bias = getattr(module, "bias", None)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    granite = getattr(config, "logits_scaling", None)
    if granite not in (None, 1, 1.0):
        # Granite (and MiniCPM3) divide the logits by logits_scaling; HyperCLOVAX (MuP) multiplies by it.
        if str(getattr(config, "model_type", "")).startswith("hyperclovax"):
            scale = (scale or 1.0) * granite
        else:
            scale = (scale or 1.0) / granite
    return Head(weight=weight, bias=bias, softcap=float(softcap) if softcap else None,
                scale=float(scale) if scale not in (None, 1, 1.0) else None)


def score_head(model):
    """The scalar head of a sequence-classification model (``score`` or ``classifier``; a PEFT
    ``modules_to_save`` wrapper stays as is, it calls the active copy), checked to output one value."""
    inner = unwrap(model)
    module = next((m for m in (getattr(inner, "score", None), getattr(inner, "classifier", None)) if m is not None),
                  None)
    if module is None:
        raise TypeError(f"{type(inner).__name__} has no score/classifier head: pass a sequence-classification "
                        "model, e.g. AutoModelForSequenceClassification.from_pretrained(name, num_labels=1)")
    out = getattr(inner.config, "num_labels", 1)
    if out != 1:
        raise ValueError(f"a reward model outputs one scalar: load it with num_labels=1 (it has {out})")
    return module
