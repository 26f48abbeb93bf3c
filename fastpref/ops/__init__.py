"""The op families, one module each, and the two things their public functions share under torch.compile."""
from __future__ import annotations

import torch

from fastpref import _backends

# torch.library.custom_op (torch >= 2.4) is what lets torch.compile keep the ops in one graph; before it, the
# compiled graph breaks around each op, which then runs eagerly.
_CUSTOM_OPS = hasattr(torch.library, "custom_op")


def compiling() -> bool:
    """True while torch.compile traces a call: the public functions then call the custom ops of ``_library``
    (imported, and so registered, on first use) instead of their autograd Functions, whose kernel calls Dynamo
    cannot trace. Eager calls keep the Functions: a custom op's dispatch costs ~40 us a call against ~8 us."""
    return _CUSTOM_OPS and torch.compiler.is_compiling()


def resolve(backend: str, device: torch.device, family: str) -> str:
    """``_backends.resolve``; under torch.compile, a constant of its arguments (``_library.resolve``)."""
    if compiling():
        from fastpref.ops import _library

        return _library.resolve(backend, device, family)
    return _backends.resolve(backend, device, family)
