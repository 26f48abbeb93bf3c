import json
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


def runs_on_gpu(item) -> bool:
    """Whether a test puts work on a GPU, or checks something else, where there is one: a parameter that names a
    GPU backend (``backend``, or a module's own fixture such as ``kern``), a module that sets ``GPU_TESTS``, the
    ``device`` fixture, the ``gpu`` mark, or a name that says cuda, gpu or triton. The others run exactly as in
    CI, on CPU tensors."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec else ()
    return (any(isinstance(v, str) and v in GPU_BACKENDS for v in params)
            or getattr(item.module, "GPU_TESTS", False) or "device" in item.fixturenames
            or item.get_closest_marker("gpu") is not None
            or any(word in item.name.lower() for word in ("cuda", "gpu", "triton")))


def pytest_addoption(parser):
    parser.addoption("--gpu-only", action="store_true",
                     help="only the tests that put work on a GPU (runs_on_gpu): benchmarks/gpu_check's selection, "
                          "since CI runs the others")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-only"):
        return
    on_gpu = [runs_on_gpu(item) for item in items]
    keep = [item for item, gpu in zip(items, on_gpu) if gpu]
    dropped = [item for item, gpu in zip(items, on_gpu) if not gpu]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# FASTPREF_TEST_LOG=FILE: each test's outcome and seconds appended to FILE as a JSON line when it ends, and each
# Triton compile's seconds as the test that launched it ran, so that a run stopped at a time limit (as GPU
# calls are) still says where its time went; benchmarks/gpu_check sums them up.
_LOG = os.environ.get("FASTPREF_TEST_LOG")
_running = {}  # nodeid -> [outcome, seconds so far]


def _log(record: dict) -> None:
    record["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_runtest_logreport(report):
    if not _LOG:
        return
    outcome, seconds = _running.setdefault(report.nodeid, ["passed", 0.0])
    if report.outcome != "passed" and outcome == "passed":
        outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
    _running[report.nodeid] = [outcome, seconds + report.duration]
    if report.when == "teardown":
        outcome, seconds = _running.pop(report.nodeid)
        _log(dict(test=report.nodeid, outcome=outcome, seconds=round(seconds, 3)))


def _triton_compiled(*, src, times, cache_hit, **_):
    try:  # a log line never breaks a compile (the listener's arguments changed between Triton versions)
        _log(dict(triton=getattr(getattr(src, "fn", None), "__name__", "?"), seconds=round(times.total / 1e6, 3),
                  cache_hit=cache_hit, test=os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]))
    except Exception:
        pass


if _LOG and not os.environ.get("TRITON_INTERPRET"):
    try:
        from triton import knobs
    except ImportError:  # no triton, or one older than its compile listener: test times only
        knobs = None
    if knobs is not None and hasattr(knobs.compilation, "listener") and knobs.compilation.listener is None:
        knobs.compilation.listener = _triton_compiled


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
