"""Backend discovery and dispatch.

Every op takes ``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``. A backend here is a module that
implements the row-kernel contracts of ``fastpref.kernels.reference`` (``row_*`` for log-probs,
``div_*`` for divergences, ``pair_forward`` for the pairwise preference losses);
the ops in ``fastpref.ops`` do the chunking, the matmuls and the autograd around it.

``auto``: CUDA tensors -> the faster of triton and cuda for the op's row-kernel family, as measured on an
H200 (``AUTO_CUDA``; the other one when it is missing, torch when neither is usable); CPU tensors -> cpu
(native C++) when the extension is built, else torch. Under ``TRITON_INTERPRET=1`` the triton backend also
accepts CPU tensors, which is how the test-suite runs the Triton kernels without a GPU; ``auto`` never picks
the interpreter.
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import torch

NAMES = ("triton", "cuda", "cpu", "torch")


class BackendInfo(NamedTuple):
    available: bool
    reason: str


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_info() -> BackendInfo:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return BackendInfo(False, f"triton is not installed ({e})")
    if triton_interpreting():
        return BackendInfo(True, "TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors")
    if torch.cuda.is_available():
        return BackendInfo(True, f"CUDA device: {torch.cuda.get_device_name()}")
    return BackendInfo(False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the interpreter)")


def _cuda_info() -> BackendInfo:
    from fastpref import _native

    if _native.cuda_ext is None:
        return BackendInfo(False, _native.cuda_error)
    count, why = _native.cuda_ext.device_count()
    if not torch.cuda.is_available():
        detail = f"; the CUDA runtime says {why}" if why else ""
        return BackendInfo(False, f"no CUDA device (fastpref._C_cuda is built, but torch.cuda.is_available() is "
                                  f"False{detail})")
    if count == 0:  # e.g. a driver too old for the CUDA runtime the module was built with (torch's may be older)
        return BackendInfo(False, f"fastpref._C_cuda sees no CUDA device although torch does: {why} "
                                  f"({_native.cuda_ext.build_info()})")
    return BackendInfo(True, f"CUDA C++ kernels ({_native.cuda_ext.build_info()}), device: "
                             f"{torch.cuda.get_device_name()}")


def _cpu_info() -> BackendInfo:
    from fastpref import _native

    if _native.ext is None:
        return BackendInfo(False, _native.error)
    return BackendInfo(True, f"native extension, {_native.ext.build_info()}")


_INFO = {
    "triton": _triton_info,
    "cuda": _cuda_info,
    "cpu": _cpu_info,
    "torch": lambda: BackendInfo(True, "pure PyTorch, any device"),
}


def backends() -> dict[str, BackendInfo]:
    """The backends of this process: ``{name: BackendInfo(available, reason)}``.

    ``reason`` says why a backend is missing (or, for an available one, what it runs on).
    """
    return {name: info() for name, info in _INFO.items()}


# (backend, op family) -> module implementing that family's row-kernel contract.
_MODULES = {
    ("triton", "logprobs"): "fastpref.kernels.triton.logprobs",
    ("triton", "divergence"): "fastpref.kernels.triton.divergence",
    ("cuda", "logprobs"): "fastpref.kernels.cuda",
    ("cuda", "divergence"): "fastpref.kernels.cuda",
    ("cpu", "logprobs"): "fastpref.kernels.cpu",
    ("cpu", "divergence"): "fastpref.kernels.cpu",
    ("torch", "logprobs"): "fastpref.kernels.reference",
    ("torch", "divergence"): "fastpref.kernels.reference",
    # The ops use the pairwise kernel on triton only; elsewhere autograd over the torch formulas is as fast.
    ("triton", "pairwise"): "fastpref.kernels.triton.pairwise",
    ("torch", "pairwise"): "fastpref.kernels.reference",
}


# ``auto``'s order of preference on CUDA tensors, per row-kernel family. An H200, bf16, N = 8192, V = 128256,
# bare kernels (benchmarks/NOTES.md "GPU, second session"): the CUDA C++ log-prob kernels took 0.425 ms
# forward and 1.414 ms forward+backward against Triton's 0.631 and 1.646; for reverse KL the CUDA forward is
# faster (1.022 ms against 1.163) but forward+backward, what training runs, slower (2.714 against 2.689;
# 2.800 against 2.639 at N = 32768, V = 32000). There is no CUDA C++ pairwise kernel.
AUTO_CUDA = {"logprobs": ("cuda", "triton"), "divergence": ("triton", "cuda"), "pairwise": ("triton",)}


def resolve(backend: str, device: torch.device, family: str) -> str:
    """The concrete backend name for ``backend`` on tensors of ``device``; raises a clear error if unusable.

    ``family`` is the row-kernel family the op runs ("logprobs", "divergence" or "pairwise"): what ``auto``
    picks on CUDA."""
    if backend not in ("auto",) + NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return next((name for name in AUTO_CUDA[family] if _INFO[name]().available), "torch")
        if device.type == "cpu" and _INFO["cpu"]().available:
            return "cpu"
        return "torch"
    info = _INFO[backend]()
    if not info.available:
        raise RuntimeError(f"backend={backend!r} is not available: {info.reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")
    return backend


def row_kernels(name: str, family: str):
    """The module implementing ``family``'s row-kernel contract ("logprobs", "divergence" or "pairwise")
    for a resolved backend name."""
    return importlib.import_module(_MODULES[name, family])
