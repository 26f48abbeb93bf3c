"""Shared benchmark harness: every implementation runs in a fresh process so that its peak memory is its own.

A case is ``"module:function"`` plus keyword arguments; the function builds the inputs on ``device`` and
returns ``(step, output_bytes)``: ``step()`` runs forward+backward once and returns a checksum tensor,
``output_bytes`` is the size of the gradients it returns (the same for every implementation of an op).

Peak memory: on CUDA ``max_memory_allocated`` over what the inputs hold; on CPU the growth of the peak
resident set size (VmHWM, reset after the inputs were made and one warm-up step ran) over the resident size
then. "extra" counts everything the step allocates, including the gradients it returns; "workspace" is
extra minus those gradients.
Memory is that of the second step, time the median of ``reps`` steps after it (device-synchronized on CUDA).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import statistics
import sys
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


def _child(target, kwargs, device, reps, queue):
    sys.path.insert(0, os.path.dirname(__file__))
    module, fn = target.split(":")
    try:
        queue.put(_time_and_memory(getattr(importlib.import_module(module), fn), kwargs, device, reps))
    except Exception as e:  # reported to the parent, which decides whether it is fatal
        queue.put(dict(error=f"{type(e).__name__}: {e}"))


def _time_and_memory(make_case, kwargs, device, reps):
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
        base = _reset_peak_rss()
    out = step()
    sync()
    extra = (torch.cuda.max_memory_allocated() - base) if cuda else (_peak_rss() - base)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(time_s=statistics.median(times), extra_bytes=extra, workspace_bytes=extra - output_bytes,
                checksum=float(out.double().sum()))


def measure(target: str, device: str, reps: int, **kwargs) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(target, kwargs, device, reps, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


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
        ok = abs(r["checksum"] - base["checksum"]) <= 1e-3 * abs(base["checksum"]) + 1e-2
        rows.append(dict(impl=label, **sizes, **r, matches_baseline=ok))
        print(f"{label:44s} {r['time_s']:10.3f} {r['time_s'] / base['time_s']:7.2f} "
              f"{r['extra_bytes'] / 2**20:10.1f} {r['extra_bytes'] / base['extra_bytes']:7.3f} "
              f"{r['workspace_bytes'] / 2**20:14.1f}{'' if ok else '  RESULT DIFFERS'}")
    return rows


def parse_args(description: str, argv=None):
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return ap.parse_args(argv)


def fastpref_backends(device: str) -> list[str]:
    """The fastpref backends worth timing on ``device`` (never the Triton interpreter)."""
    import fastpref

    usable = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}[device]
    return [b for b in usable if fastpref.backends()[b].available]


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


def fused_loss_main(op: str, doc: str, title: str, peers: list[tuple[str, str]], sizes: list[dict],
                    quick_sizes: list[dict], argv=None) -> None:
    """The run of a fused-linear loss benchmark (``benchmarks/<op>.py``, whose ``case`` takes ``impl`` and the
    size keys): peers (label, impl) first, the first being the baseline, then every fastpref backend, at
    H = 1024, V = 32000 fp32 on CPU or H = 4096, V = 128256 bf16 on CUDA."""
    import torch

    args = parse_args(doc.splitlines()[0], argv)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    H, V = (1024, 32000) if args.device == "cpu" else (4096, 128256)
    print(f"{title}: fwd+bwd on {args.device} ({device_name(args.device)}), {dtype}, torch {torch.__version__}")
    cases = [(label, f"{op}:case", dict(impl=impl)) for label, impl in peers]
    cases += [(f"fastpref {b}", f"{op}:case", dict(impl=b)) for b in fastpref_backends(args.device)]
    rows = []
    for size in quick_sizes if args.quick else sizes:
        rows += report(title, cases, device=args.device, reps=2 if args.quick else 3,
                       sizes=dict(size, H=H, V=V, dtype=dtype))
    write_results(args, op, rows)
