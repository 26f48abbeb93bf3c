"""The optional compiled extensions: ``fastpref._C`` (native CPU kernels) and ``fastpref._C_cuda`` (CUDA kernels).

``ext`` / ``cuda_ext`` is the module, or None when it is unavailable; ``error`` / ``cuda_error`` then says why
(None otherwise). ``fastpref._C_cuda`` links the CUDA runtime statically, so it imports without a GPU or driver.
"""
from __future__ import annotations

import importlib
import importlib.util


def _load(name: str, what: str):
    """(module, None), or (None, why it is unavailable)."""
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        if importlib.util.find_spec(name) is None:
            return None, (f"fastpref was installed without its compiled extension {name} ({what}; see the build "
                          "log; reinstall with `pip install -v .` to show it)")
        return None, f"{name} failed to load: {exc}"


ext, error = _load("fastpref._C", "native CPU kernels")
cuda_ext, cuda_error = _load("fastpref._C_cuda", "CUDA kernels, built when nvcc is found at install time")
