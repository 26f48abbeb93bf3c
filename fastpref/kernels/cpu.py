"""Native C++ row kernels (``fastpref._C``) behind the row-kernel contracts of ``fastpref.kernels.reference``.

Same signatures and semantics as ``reference.row_forward`` / ``reference.row_backward`` and
``reference.div_forward`` / ``reference.div_backward``, on CPU tensors (the checks: ``kernels/_raw.py``).
Threads follow ``torch.get_num_threads()``. For the log-prob kernels, labels outside [0, V) that are not
``ignore_index`` must be rejected by the caller (as the ops do); the kernel itself treats them as ignored
rather than reading out of bounds. The divergence kernels use labels only to mask rows.
"""
from __future__ import annotations

import torch

from fastpref import _native
from fastpref.kernels._raw import RawKernels


def _ext():
    if _native.ext is None:
        raise RuntimeError(_native.error)
    return _native.ext


_KERNELS = RawKernels("cpu", _ext, lambda x: torch.get_num_threads())
row_forward = _KERNELS.row_forward
row_backward = _KERNELS.row_backward
div_forward = _KERNELS.div_forward
div_backward = _KERNELS.div_backward
