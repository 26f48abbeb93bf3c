import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpref  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def available_backends():
    return [name for name, info in fastpref.backends().items() if info.available]


def backend_params(*names):
    """pytest params for the named backends, skipped (with the reason) where unusable here."""
    infos = fastpref.backends()
    return [pytest.param(n, marks=pytest.mark.skipif(not infos[n].available, reason=infos[n].reason), id=n)
            for n in names]


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class CountMatmuls(TorchDispatchMode):
    """Counts the matmuls (mm, addmm) run inside it, and their multiply-adds (m x k x n): how the fused-linear
    tests see a recompute."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "addmm_"):
            self.count += 1
            a, b = args[:2] if name == "mm" else args[1:3]
            self.macs += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))
