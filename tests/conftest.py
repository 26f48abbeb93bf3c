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


GPU_BACKENDS = ("triton", "cuda")


@pytest.fixture(autouse=True)
def _gpu_default_device(request):
    """On a CUDA machine the triton and cuda backends take CUDA tensors only, while the tests build their inputs
    with plain ``torch.randn``: for a test parametrized with such a ``backend``, or in a module that sets
    ``GPU_TESTS = True`` (it runs one of those backends throughout), CUDA is the default device. Modules that
    place their tensors themselves set ``EXPLICIT_DEVICES = True``. Without CUDA nothing changes: the Triton
    kernels run in the interpreter on CPU tensors."""
    module = request.module
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    wants_gpu = backend in GPU_BACKENDS or getattr(module, "GPU_TESTS", False)
    if not torch.cuda.is_available() or not wants_gpu or getattr(module, "EXPLICIT_DEVICES", False):
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)


def generator(seed):
    """A seeded generator on the default device (``torch.randn(..., generator=g)`` needs them to agree)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


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
