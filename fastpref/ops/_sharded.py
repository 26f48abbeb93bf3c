"""Sharded output heads for the fused-linear ops: ``gathered`` gives the op the full weight (or bias) of an FSDP2
DTensor, whose gradient flows back to the shards, or of a DeepSpeed ZeRO-3 parameter.

A head is sharded when it is used outside its module's forward (``model.lm_head.weight`` after the body ran):
inside it, FSDP2 and ZeRO-3 have already gathered it and the op sees a plain tensor.
"""
from __future__ import annotations

import sys

import torch


def _dtensor_types():
    """The module of DTensor and its placements, where it is loaded: a tensor cannot be a DTensor otherwise, and
    importing it costs more than fastpref's own import."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):  # the second before torch 2.5
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module
    return None


def gathered(name: str, t):
    """The full tensor of ``t`` (None and plain tensors unchanged).

    - FSDP2 DTensor (any ``Shard`` placement on a 1-D mesh): ``full_tensor()``, whose backward reduce-scatters
      the gradient into each rank's shard, averaged over the mesh as FSDP2 reduces its own gradients (the
      mesh is data parallel: each rank's gradient is its batch's). Other layouts (2-D meshes, Replicate,
      Partial) raise: on a tensor-parallel dimension the ranks share their batch, and averaging would be wrong.
    - DeepSpeed ZeRO-3 parameter (``ds_id`` / ``ds_status``): used as is when gathered (``ds_status``
      AVAILABLE: inside its module's forward, or a ``GatheredParameters`` context); without a gradient (a frozen
      reference head, or no grad mode) gathered with ``deepspeed.zero.GatheredParameters`` and copied (ZeRO-3
      frees the gathered buffer on leaving the context). One that needs a gradient raises: ZeRO-3 accumulates
      a gradient into the full parameter and its hooks reduce-scatter it from there, so the parameter must stay
      gathered until the backward has run, which only the caller's scope spans. Without deepspeed importable,
      a partitioned parameter raises, saying to gather it.
    """
    if t is None:
        return t
    dtensor = _dtensor_types()
    if dtensor is not None and isinstance(t, dtensor.DTensor):
        mesh, placements = t.device_mesh, tuple(t.placements)
        if mesh.ndim != 1 or not isinstance(placements[0], dtensor.Shard):
            raise ValueError(
                f"{name} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; fastpref gathers "
                "FSDP2's layout only (Shard on a 1-D data-parallel mesh). Pass a full tensor (e.g. "
                f"{name}.full_tensor() with the gradient placement you need), or, for a vocabulary-sharded "
                f"(tensor-parallel) head, {name}.to_local() with process_group= where the op supports it")
        return t.full_tensor(grad_placements=[dtensor.Partial("avg")])
    if hasattr(t, "ds_id") and hasattr(t, "ds_status"):
        return _zero3_gathered(name, t)
    return t


def _zero3_gathered(name, param):
    if getattr(param.ds_status, "name", None) == "AVAILABLE":  # already gathered (inside its module's forward)
        return param
    gather = (f"`with deepspeed.zero.GatheredParameters([{name}]):` around the loss's forward and backward, or "
              f"the call inside a module's forward with deepspeed.zero.register_external_parameter(module, {name})")
    if param.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (ds_id={param.ds_id}) that needs a gradient, which "
            f"ZeRO-3 accumulates only while the parameter is gathered: gather it for the backward too, e.g. {gather}")
    try:
        import deepspeed
    except ImportError:
        raise RuntimeError(
            f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (ds_id={param.ds_id}) and deepspeed is not "
            f"importable here to gather it: gather it before the call, e.g. {gather}") from None
    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().clone()
