"""CUDA C++ row kernels (``fastpref._C_cuda``, csrc/*_cuda.cu) behind the row-kernel contracts of
``fastpref.kernels.reference``.

Same signatures and semantics as ``reference.row_forward`` / ``reference.row_backward`` and
``reference.div_forward`` / ``reference.div_backward`` (and as ``kernels/cpu.py``), on CUDA tensors: 2-D
rows with a contiguous last dim (any row stride), float32 / bfloat16 / float16, every tensor on x's device.
The kernels run on that device's current stream (``torch.cuda.current_stream()``), asynchronously like any
torch op. Labels outside [0, V) that are not ``ignore_index`` must be rejected by the caller (as the ops do);
the kernels treat them as ignored rather than reading out of bounds.
"""
from __future__ import annotations

import torch

from fastpref import _native
from fastpref.kernels._raw import RawKernels


def _ext():
    if _native.cuda_ext is None:
        raise RuntimeError(_native.cuda_error)
    return _native.cuda_ext


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


_KERNELS = RawKernels("cuda", _ext, _stream, context=lambda x: torch.cuda.device(x.device))
row_forward = _KERNELS.row_forward
row_backward = _KERNELS.row_backward
div_forward = _KERNELS.div_forward
div_backward = _KERNELS.div_backward
