"""Argument checks shared by the ops: every bad input becomes an exception that names the argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t, *, dim: int | None = None, min_dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    k0, t0 = items[0]
    for k, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{k} is on {t.device} but {k0} is on {t0.device}")


def check_labels(labels, shape: torch.Size, vocab: int, ignore_index: int) -> None:
    """labels: integer tensor of ``shape`` with values in [0, vocab) or == ignore_index."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)} (the leading dims of the input), "
                         f"got {tuple(labels.shape)}")
    # Under torch.compile the value check is a graph break: the compiled ops run it when they execute
    # (fastpref/ops/_library.py).
    if not torch.compiler.is_compiling():
        check_label_values(labels, vocab, ignore_index)


def check_label_values(labels, vocab: int, ignore_index: int) -> None:
    """Every label in [0, vocab) or == ignore_index."""
    if labels.numel() == 0:
        return
    # One reduction and one host sync: the price of never reading a logit row out of bounds.
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, found {value}")


def check_chunk_size(chunk_size) -> None:
    """Tokens per chunk of the fused-linear ops: a positive int, or None for the automatic budget."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_positive(name: str, value, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``allow_zero``), or None with ``allow_none``."""
    if value is None and allow_none:
        return
    # abs(value) < inf rather than math.isfinite, which breaks a torch.compile(dynamic=True) graph: Dynamo makes
    # float defaults symbolic there.
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) < math.inf or value < 0
            or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
