"""Benchmark harness: every implementation runs in a fresh process so that its peak memory is its own.

A case is ``"module:function"`` plus keyword arguments; the function builds the inputs on ``device`` and
returns ``(step, output_bytes)``: ``step()`` runs forward+backward once and returns a checksum tensor
(``step(backward=False)`` the forward alone, still recording the autograd graph as in training),
``output_bytes`` is the size of the gradients it returns (the same for every implementation of an op);
``step.work``, where set, is the (forward, forward+backward) work of the op's floor at these inputs.

Peak memory: on CUDA ``max_memory_allocated`` over what the inputs hold; on CPU the growth of the peak
resident set size (VmHWM, reset after the inputs were made and one warm-up step ran) over the resident size
then, with glibc told to map blocks of 64 KiB and more on their own for that step (so that blocks the
warm-up freed do not hide the step's peak). "extra" counts everything the step allocates, including the gradients it returns; "workspace" is
extra minus those gradients.
Memory is that of the second step, time the median of ``reps`` steps after it (CUDA events on CUDA).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import statistics
import time


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Resets the peak RSS (Linux: "5" to clear_refs) so that set-up transients do not hide the step's
    peak; returns the current RSS, the baseline."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _peak_rss() -> int:
    return _status_bytes("VmHWM")


def _malloc_tracks_rss(on: bool, libc=None):
    """glibc only: with ``on``, blocks of 64 KiB and more are mmapped (and unmapped when freed) and the free
    heap is trimmed, so that the resident size follows what is allocated: otherwise blocks the warm-up freed
    (under glibc's dynamic mmap threshold, up to 32 MiB) are reused without growing the RSS and the peak
    misses them. ``off`` (for the timed steps) sets the threshold to 32 MiB, glibc's dynamic maximum."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    try:
        libc = libc or ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 16 if on else 32 << 20)
        if on:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return libc


def _child(target, kwargs, device, reps, fwd_reps, queue):
    import warnings

    # torch.compile of an eager path that calls into fastpref meets its extension: a graph break, not news
    warnings.filterwarnings("ignore", message="Dynamo does not know how to trace")
    module, fn = target.split(":")
    try:
        queue.put(_time_and_memory(getattr(importlib.import_module(module), fn), kwargs, device, reps, fwd_reps))
    except Exception as e:  # reported to the parent, which decides whether it is fatal
        queue.put(dict(error=f"{type(e).__name__}: {e}"))


def _median_time(fn, reps: int, cuda: bool) -> float:
    import torch

    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_and_memory(make_case, kwargs, device, reps, fwd_reps=0):
    import torch

    step, output_bytes = make_case(device=device, **kwargs)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()  # warm-up: one-time costs (torch.compile, lazy imports, allocator pools) are not the op's memory
    sync()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        libc = _malloc_tracks_rss(True)
        base = _reset_peak_rss()
    out = step()
    sync()
    extra = (torch.cuda.max_memory_allocated() - base) if cuda else (_peak_rss() - base)
    if not cuda:
        _malloc_tracks_rss(False, libc)
    result = dict(time_s=_median_time(step, reps, cuda), extra_bytes=extra, workspace_bytes=extra - output_bytes,
                  checksum=float(out.double().sum()))
    if fwd_reps:
        result["fwd_time_s"] = _median_time(lambda: step(backward=False), fwd_reps, cuda)
    if hasattr(step, "work"):  # the case's own count of the floor's work, where the sizes alone do not tell
        result["work"] = step.work
    return result


_CONTEXT = {}
PRELOAD = ["torch", "fastpref", "fastpref.bench.harness"]
# torch.compile's modules too where they are safe to import before forking: on a CUDA machine importing them
# may initialize CUDA, and a process forked after that cannot use the GPU.
PRELOAD_CPU = PRELOAD + ["torch._dynamo", "torch._inductor.compile_fx"]


def _fork_can_use_cuda(queue):
    import torch

    queue.put(not torch.cuda._is_in_bad_fork())


def _context(device: str = "cpu"):
    """A fork server that imported torch and fastpref once (and torch.compile's modules on CPU) and has run
    nothing: each measurement is a fresh process forked from it, without paying the imports again. On CUDA a
    forked child is probed first: should a preloaded module have initialized CUDA, processes are spawned."""
    if device not in _CONTEXT:
        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD if device == "cuda" else PRELOAD_CPU)
        except ValueError:  # no fork server on this platform
            ctx = mp.get_context("spawn")
        else:
            # The server imports PRELOAD with its working directory first on sys.path (Python 3.11 ignores the
            # parent's sys.path there), and its children keep those modules: run from a source checkout, an
            # installed fastpref would be measured as the checkout's. Start it where this fastpref lives.
            import multiprocessing.forkserver

            import fastpref

            cwd = os.getcwd()
            os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(fastpref.__file__))))
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                os.chdir(cwd)
            if device == "cuda":
                queue = ctx.Queue()
                probe = ctx.Process(target=_fork_can_use_cuda, args=(queue,))
                probe.start()
                ok = queue.get(timeout=120)
                probe.join()
                if not ok:
                    ctx = mp.get_context("spawn")
        _CONTEXT[device] = ctx
    return _CONTEXT[device]


def measure(target: str, device: str, reps: int, fwd_reps: int = 0, **kwargs) -> dict:
    """Runs ``target(device=device, **kwargs)`` in a fresh process: ``time_s`` (fwd+bwd), ``extra_bytes``,
    ``workspace_bytes``, ``checksum`` and, with ``fwd_reps``, ``fwd_time_s``; or ``error``."""
    ctx = _context(device)
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(target, kwargs, device, reps, fwd_reps, queue))
    p.start()
    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except Exception:  # queue.Empty: still running, or died without reporting (killed, out of memory)
                if not p.is_alive():
                    return dict(error=f"the measuring process died (exit code {p.exitcode})")
    finally:
        p.join()


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def fastpref_backends(device: str) -> list[str]:
    """The fastpref backends worth timing on ``device`` (never the Triton interpreter)."""
    import fastpref

    return [b for b in device_backends(device) if fastpref.backends()[b].available]


def device_backends(device: str) -> tuple[str, ...]:
    """The fastpref backends that take ``device``'s tensors, available here or not."""
    if device == "cpu":
        return ("cpu", "torch")
    if os.environ.get("TRITON_INTERPRET") == "1":  # triton would run in the interpreter: not a benchmark
        return ("cuda", "torch")
    return ("triton", "cuda", "torch")


def checksums_match(value: float, reference: float) -> bool:
    """Whether a result's checksum (the sum of its output) matches the reference's."""
    return abs(value - reference) <= 1e-3 * abs(reference) + 1e-2


# ---- the per-op command lines (``python benchmarks/<op>.py``): plain-text report, one JSON per op ----

def report(title: str, cases: list[tuple[str, str, dict]], *, device: str, reps: int, sizes: dict) -> list[dict]:
    """Runs each (label, target, kwargs) in its own process; prints ratios against the first (the baseline).

    A peer that cannot run here (not installed, needs a GPU) gets a "not runnable" row; a fastpref failure
    stops the run."""
    print(f"\n{title}  {sizes}")
    print(f"{'implementation':44s} {'time (s)':>10s} {'x base':>7s} {'extra MiB':>10s} {'x base':>7s} "
          f"{'workspace MiB':>14s}")
    rows, base = [], None
    for label, target, kwargs in cases:
        r = measure(target, device, reps, **sizes, **kwargs)
        if "error" in r:
            if label.startswith("fastpref"):
                raise SystemExit(f"{label} failed: {r['error']}")
            print(f"{label:44s} not runnable here: {r['error'][:70]}")
            rows.append(dict(impl=label, **sizes, **r))
            continue
        base = base or r
        ok = checksums_match(r["checksum"], base["checksum"])
        rows.append(dict(impl=label, **sizes, **{k: v for k, v in r.items() if k != "work"}, matches_baseline=ok))
        print(f"{label:44s} {r['time_s']:10.3f} {r['time_s'] / base['time_s']:7.2f} "
              f"{r['extra_bytes'] / 2**20:10.1f} {r['extra_bytes'] / base['extra_bytes']:7.3f} "
              f"{r['workspace_bytes'] / 2**20:14.1f}{'' if ok else '  RESULT DIFFERS'}")
    return rows


def parse_args(description: str, argv=None, out: str = os.path.join("benchmarks", "results")):
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--out", default=out)
    return ap.parse_args(argv)


def write_results(args, op: str, rows: list[dict]) -> None:
    import json

    import torch

    import fastpref

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{op}-{args.device}{'-quick' if args.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(dict(device=args.device, device_name=device_name(args.device), torch=torch.__version__,
                       fastpref=fastpref.__version__, cpu_threads=torch.get_num_threads(), rows=rows), f, indent=1)
    print(f"\nwrote {path}")


def legacy_main(op, argv=None, out: str = os.path.join("benchmarks", "results")) -> None:
    """The per-op command line (``python benchmarks/<op>.py``) of ``op``, a module of this package: for each
    (subtitle, sizes, peers) of ``op.legacy_variants(device, quick)``, the peers (label, impl) in order, the
    first being the baseline, then every fastpref backend; rows go to ``<out>/<op>-<device>[-quick].json``."""
    import torch

    args = parse_args(op.__doc__.splitlines()[0], argv, out)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    print(f"{op.SUITE.op} ({op.SUITE.title}) fwd+bwd on {args.device} ({device_name(args.device)}), {dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    target = f"{op.__name__}:case"
    rows = []
    for subtitle, sizes, peers in op.legacy_variants(args.device, args.quick):
        cases = [(label, target, dict(impl=impl)) for label, impl in peers]
        cases += [(f"fastpref {b}", target, dict(impl=b)) for b in fastpref_backends(args.device)]
        rows += report(subtitle, cases, device=args.device, reps=2 if args.quick else 3,
                       sizes=dict(sizes, dtype=dtype))
    write_results(args, op.SUITE.name, rows)


def fused_legacy_variants(suite, device: str, sizes: list[dict]) -> list[tuple[str, dict, list[tuple[str, str]]]]:
    """``legacy_variants`` of a fused-linear loss: ``sizes`` at H = 1024, V = 32000 (fp32) on CPU or
    H = 4096, V = 128256 (bf16) on CUDA, every peer."""
    from . import HEADS

    H, V = HEADS["full"][device]
    variants = []
    for s in sizes:
        s = dict(s, H=H, V=V)
        variants.append((suite.title, s, [(i.label, i.key) for i in suite.peers_for(device, s)]))
    return variants
