"""Python side of the compiled row kernels: ``fastpref._C`` (``kernels/cpu.py``) and ``fastpref._C_cuda``
(``kernels/cuda.py``) take the same raw-pointer arguments (csrc/bindings_common.h), which ``RawKernels`` checks
and fills in; each backend adds its device, its module and the value of the call's last argument (the thread
count, or the CUDA stream).

Same signatures and semantics as ``reference.row_forward`` / ``reference.row_backward`` and
``reference.div_forward`` / ``reference.div_backward``. For the log-prob kernels, labels outside [0, V) that
are not ``ignore_index`` must be rejected by the caller (as the ops do); the kernels treat them as ignored
rather than reading out of bounds. The divergence kernels use labels only to mask rows.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dtype_code(name: str, t: torch.Tensor) -> int:
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}") from None


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class RawKernels:
    """The four contract functions over one compiled module.

    ``device_type``: "cpu" or "cuda". ``ext()``: the module (raises when unavailable). ``last_arg(x)``: the
    module's last argument for a call on ``x``. ``context(x)``: a context manager around the call (e.g. the
    CUDA device guard).
    """

    def __init__(self, device_type: str, ext: Callable, last_arg: Callable[[torch.Tensor], int],
                 context: Callable[[torch.Tensor], contextlib.AbstractContextManager] = lambda x: contextlib.nullcontext()):
        self.device_type, self.ext, self.last_arg, self.context = device_type, ext, last_arg, context
        self.label = "a CPU tensor" if device_type == "cpu" else f"a {device_type.upper()} tensor"

    def _check_device(self, name: str, t: torch.Tensor, device: torch.device | None) -> None:
        if t.device.type != self.device_type:
            raise ValueError(f"{name} must be {self.label}, got one on {t.device}")
        if device is not None and t.device != device:
            raise ValueError(f"{name} must be on {device} like x, got one on {t.device}")

    def _check_rows(self, name: str, t: torch.Tensor, shape=None, device=None) -> None:
        self._check_device(name, t, device)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [n, V], got shape {tuple(t.shape)}")
        if shape is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dim, got strides {t.stride()}")

    def _row_vector(self, name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor | None:
        if t is None:
            return None
        self._check_device(name, t, device)
        if t.numel() != n:
            raise ValueError(f"{name} must have {n} elements, got shape {tuple(t.shape)}")
        return t.reshape(n).to(dtype).contiguous()

    def row_forward(self, x, labels, *, temperature=1.0, softcap=0.0, ignore_index=-100, with_entropy=False):
        ext = self.ext()
        self._check_rows("x", x)
        n, V = x.shape
        dev = x.device
        labels = self._row_vector("labels", labels, n, torch.int64, dev)
        logp = torch.empty(n, dtype=torch.float32, device=dev)
        lse = torch.empty(n, dtype=torch.float32, device=dev)
        entropy = torch.empty(n, dtype=torch.float32, device=dev) if with_entropy else None
        with self.context(x):
            ext.logprobs_fwd(x.data_ptr(), x.stride(0), n, V, _dtype_code("x", x), labels.data_ptr(),
                             float(temperature), float(softcap), int(ignore_index),
                             logp.data_ptr(), lse.data_ptr(), _ptr(entropy), self.last_arg(x))
        return logp, lse, entropy

    def row_backward(self, x, labels, lse, entropy, grad_logp, grad_entropy, out, *, temperature=1.0, softcap=0.0,
                     ignore_index=-100):
        ext = self.ext()
        self._check_rows("x", x)
        self._check_rows("out", out, x.shape, x.device)
        n, V = x.shape
        f32, dev = torch.float32, x.device
        labels = self._row_vector("labels", labels, n, torch.int64, dev)
        lse = self._row_vector("lse", lse, n, f32, dev)
        entropy = self._row_vector("entropy", entropy, n, f32, dev)
        grad_logp = self._row_vector("grad_logp", grad_logp, n, f32, dev)
        grad_entropy = self._row_vector("grad_entropy", grad_entropy, n, f32, dev)
        with self.context(x):
            ext.logprobs_bwd(x.data_ptr(), x.stride(0), n, V, _dtype_code("x", x), labels.data_ptr(),
                             lse.data_ptr(), _ptr(entropy), _ptr(grad_logp), _ptr(grad_entropy),
                             out.data_ptr(), out.stride(0), _dtype_code("out", out),
                             float(temperature), float(softcap), int(ignore_index), self.last_arg(x))

    def div_forward(self, x, xr, labels, *, div_id, param, temperature=1.0, ignore_index=-100):
        ext = self.ext()
        self._check_rows("x", x)
        self._check_rows("xr", xr, x.shape, x.device)
        n, V = x.shape
        labels = self._row_vector("labels", labels, n, torch.int64, x.device)
        outs = tuple(torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(5))
        with self.context(x):
            ext.div_fwd(x.data_ptr(), x.stride(0), _dtype_code("x", x), xr.data_ptr(), xr.stride(0),
                        _dtype_code("xr", xr), n, V, _ptr(labels), int(ignore_index), int(div_id), float(param),
                        float(temperature), *(t.data_ptr() for t in outs), self.last_arg(x))
        return outs

    def div_backward(self, x, xr, labels, lse, lse_r, s_a, s_b, grad, out_x, out_xr, *, div_id, param,
                     temperature=1.0, ignore_index=-100):
        ext = self.ext()
        self._check_rows("x", x)
        self._check_rows("xr", xr, x.shape, x.device)
        n, V = x.shape
        outs = []
        for name, out in (("out_x", out_x), ("out_xr", out_xr)):
            if out is None:
                outs += [0, 0, 0]
            else:
                self._check_rows(name, out, x.shape, x.device)
                outs += [out.data_ptr(), out.stride(0), _dtype_code(name, out)]
        f32 = torch.float32
        labels = self._row_vector("labels", labels, n, torch.int64, x.device)
        stats = [self._row_vector(name, t, n, f32, x.device) for name, t in
                 (("lse", lse), ("lse_r", lse_r), ("s_a", s_a), ("s_b", s_b), ("grad", grad))]
        with self.context(x):
            ext.div_bwd(x.data_ptr(), x.stride(0), _dtype_code("x", x), xr.data_ptr(), xr.stride(0),
                        _dtype_code("xr", xr), n, V, _ptr(labels), int(ignore_index), int(div_id), float(param),
                        float(temperature), *(t.data_ptr() for t in stats), *outs, self.last_arg(x))
