"""Native C++ row kernels (``fastpref._C``) behind the row-kernel contracts of ``fastpref.kernels.reference``.

Same signatures and semantics as ``reference.row_forward`` / ``reference.row_backward`` and
``reference.div_forward`` / ``reference.div_backward``, on CPU tensors.
Threads follow ``torch.get_num_threads()``. For the log-prob kernels, labels outside [0, V) that are not
``ignore_index`` must be rejected by the caller (as the ops do); the kernel itself treats them as ignored
rather than reading out of bounds. The divergence kernels use labels only to mask rows.
"""
from __future__ import annotations

import torch

from fastpref import _native

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _ext():
    if _native.ext is None:
        raise RuntimeError(_native.error)
    return _native.ext


def _dtype_code(name: str, t: torch.Tensor) -> int:
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}") from None


def _check_rows(name: str, t: torch.Tensor, shape=None) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got one on {t.device}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, V], got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dim, got strides {t.stride()}")


def _row_vector(name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got one on {t.device}")
    if t.numel() != n:
        raise ValueError(f"{name} must have {n} elements, got shape {tuple(t.shape)}")
    return t.reshape(n).to(dtype).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def row_forward(x, labels, *, temperature=1.0, softcap=0.0, ignore_index=-100, with_entropy=False):
    ext = _ext()
    _check_rows("x", x)
    n, V = x.shape
    labels = _row_vector("labels", labels, n, torch.int64)
    logp = torch.empty(n, dtype=torch.float32)
    lse = torch.empty(n, dtype=torch.float32)
    entropy = torch.empty(n, dtype=torch.float32) if with_entropy else None
    ext.logprobs_fwd(x.data_ptr(), x.stride(0), n, V, _dtype_code("x", x), labels.data_ptr(),
                     float(temperature), float(softcap), int(ignore_index),
                     logp.data_ptr(), lse.data_ptr(), _ptr(entropy), torch.get_num_threads())
    return logp, lse, entropy


def row_backward(x, labels, lse, entropy, grad_logp, grad_entropy, out, *, temperature=1.0, softcap=0.0,
                 ignore_index=-100):
    ext = _ext()
    _check_rows("x", x)
    _check_rows("out", out, x.shape)
    n, V = x.shape
    f32 = torch.float32
    labels = _row_vector("labels", labels, n, torch.int64)
    lse = _row_vector("lse", lse, n, f32)
    entropy = _row_vector("entropy", entropy, n, f32)
    grad_logp = _row_vector("grad_logp", grad_logp, n, f32)
    grad_entropy = _row_vector("grad_entropy", grad_entropy, n, f32)
    ext.logprobs_bwd(x.data_ptr(), x.stride(0), n, V, _dtype_code("x", x), labels.data_ptr(),
                     lse.data_ptr(), _ptr(entropy), _ptr(grad_logp), _ptr(grad_entropy),
                     out.data_ptr(), out.stride(0), _dtype_code("out", out),
                     float(temperature), float(softcap), int(ignore_index), torch.get_num_threads())


def div_forward(x, xr, labels, *, div_id, param, temperature=1.0, ignore_index=-100):
    ext = _ext()
    _check_rows("x", x)
    _check_rows("xr", xr, x.shape)
    n, V = x.shape
    labels = _row_vector("labels", labels, n, torch.int64)
    outs = tuple(torch.empty(n, dtype=torch.float32) for _ in range(5))
    ext.div_fwd(x.data_ptr(), x.stride(0), _dtype_code("x", x), xr.data_ptr(), xr.stride(0), _dtype_code("xr", xr),
                n, V, _ptr(labels), int(ignore_index), int(div_id), float(param), float(temperature),
                *(t.data_ptr() for t in outs), torch.get_num_threads())
    return outs


def div_backward(x, xr, labels, lse, lse_r, s_a, s_b, grad, out_x, out_xr, *, div_id, param, temperature=1.0,
                 ignore_index=-100):
    ext = _ext()
    _check_rows("x", x)
    _check_rows("xr", xr, x.shape)
    n, V = x.shape
    outs = []
    for name, out in (("out_x", out_x), ("out_xr", out_xr)):
        if out is None:
            outs += [0, 0, 0]
        else:
            _check_rows(name, out, x.shape)
            outs += [out.data_ptr(), out.stride(0), _dtype_code(name, out)]
    f32 = torch.float32
    labels = _row_vector("labels", labels, n, torch.int64)
    stats = [_row_vector(name, t, n, f32) for name, t in
             (("lse", lse), ("lse_r", lse_r), ("s_a", s_a), ("s_b", s_b), ("grad", grad))]
    ext.div_bwd(x.data_ptr(), x.stride(0), _dtype_code("x", x), xr.data_ptr(), xr.stride(0), _dtype_code("xr", xr),
                n, V, _ptr(labels), int(ignore_index), int(div_id), float(param), float(temperature),
                *(t.data_ptr() for t in stats), *outs, torch.get_num_threads())
