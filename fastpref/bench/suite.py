"""The ``fastpref bench`` run: the size sweep of every op family over every implementation, the floors, the
terminal tables, ``results.json`` and one PNG plot per op in the output folder.

The JSON is rewritten after each size with ``partial: true``, so a run stopped early keeps what it measured.
Rows of the JSON (``results["rows"]``), one per (op, sizes, implementation):
``op``, ``impl`` (the case's ``impl``: ``eager``, ``compile``, a peer, or a fastpref backend), ``label``
and ``name`` (long and short descriptions),
``kind`` (``reference``: the eager path every other row is checked against; ``peer``; ``fastpref``),
``sizes`` (with ``dtype``), ``x`` (the sweep's value), ``status`` (``ok``, ``not installed``, ``needs CUDA``,
``unavailable`` for a fastpref backend missing here, ``failed``), ``reason``, and when ``ok``: ``fwd_s``,
``fwd_bwd_s`` (medians), ``peak_bytes`` (growth of the fwd+bwd step's peak, including the gradients it
returns), ``workspace_bytes`` (minus those gradients), ``checksum``, ``matches_reference``,
``vs_reference`` (``time``, ``memory`` ratios), ``floor_s`` and ``x_floor`` (``fwd``, ``fwd_bwd``: the time
over the floor, 1.0 = at the hardware limit), ``process_s`` (the wall time of the row's process: start-up,
compilation and the measurement).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import time

import torch

from . import OPS
from .harness import checksums_match, device_backends, device_name, measure

SCHEMA = "fastpref-bench/1"
MODES = dict(full=3, quick=3, tiny=1)  # mode -> timed repetitions (after a warm-up and a memory step)


# ---------------------------------------------------------------- environment

def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import fastpref

    return dict(python=platform.python_version(), torch=torch.__version__, fastpref=fastpref.__version__,
                cuda=torch.version.cuda, triton=_version("triton"), liger_kernel=_version("liger-kernel") or
                _version("liger_kernel"), cut_cross_entropy=_version("cut-cross-entropy"),
                rich=_version("rich"), matplotlib=_version("matplotlib"))


def measure_floors(device: str, dtype: str, tiny: bool = False) -> dict:
    """Copy bandwidth (bytes read + written per second, ``dst.copy_(src)``) and matmul rate (a square GEMM
    in the benchmark dtype), the best of a few repetitions after a warm-up (a floor is a best case): small,
    quick measurements."""
    cuda = device == "cuda"
    copy_bytes = (2**20 if tiny else 2**30 if cuda else 2**28)
    n = 256 if tiny else 8192 if cuda else 2048
    reps = 3 if tiny else 10 if cuda else 5

    def timed(fn):
        fn()
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    src = dst = None  # freed before the GEMM
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    mm_s = timed(lambda: a @ b)
    a = b = None
    if cuda:
        torch.cuda.empty_cache()  # the measurements run in other processes: leave them the memory
    return dict(copy_bytes_per_s=2 * copy_bytes / copy_s, matmul_flops_per_s=2 * n**3 / mm_s, dtype=dtype,
                copy_buffer_bytes=copy_bytes, matmul_n=n,
                doc=f"copy: best time of dst.copy_(src) of {copy_bytes} bytes, counting bytes read + written; "
                    f"matmul: best time of a {n} x {n} x {n} {dtype} GEMM, 2 n^3 FLOPs")


def peer_status(impl, device: str, missing: set[str]) -> tuple[str, str | None]:
    """("ok", None), or the status and reason of a row that does not run."""
    if impl.needs and (impl.needs in missing or importlib.util.find_spec(impl.needs) is None):
        return "not installed", f"pip install {impl.needs.replace('_', '-')}"
    if impl.cuda_only and device != "cuda":
        return "needs CUDA", "Triton kernels: GPU only"
    return "ok", None


# ---------------------------------------------------------------- the run

def _jobs(suite, device: str, sizes: dict, impls: set[str] | None, missing: set[str]) -> list[dict]:
    """The rows of one (op, sizes), before measurement: each with ``status`` "ok" (to measure) or why not."""
    import fastpref

    rows = []
    for i, peer in enumerate(suite.peers_for(None, sizes)):  # rows for those that cannot run too
        if impls and peer.key not in impls and i:
            continue
        status, reason = peer_status(peer, device, missing)
        rows.append(dict(impl=peer.key, label=peer.label, name=peer.short, kind="reference" if i == 0 else "peer",
                         status=status, reason=reason))
    infos = fastpref.backends()
    for b in device_backends(device):
        if impls and b not in impls:
            continue
        rows.append(dict(impl=b, label=f"fastpref {b}", name=f"fastpref {b}", kind="fastpref",
                         status="ok" if infos[b].available else "unavailable",
                         reason=None if infos[b].available else infos[b].reason))
    return rows


def _finish(row: dict, result: dict, ref: dict | None, floor_s: tuple[float, float]) -> None:
    if "error" in result:
        row.update(status="failed", reason=result["error"])
        return
    row.update(fwd_s=result["fwd_time_s"], fwd_bwd_s=result["time_s"], peak_bytes=result["extra_bytes"],
               workspace_bytes=result["workspace_bytes"], checksum=result["checksum"],
               floor_s=dict(fwd=floor_s[0], fwd_bwd=floor_s[1]),
               x_floor=dict(fwd=result["fwd_time_s"] / floor_s[0], fwd_bwd=result["time_s"] / floor_s[1]))
    if ref is not None and ref.get("status") == "ok":
        row.update(matches_reference=checksums_match(row["checksum"], ref["checksum"]),
                   vs_reference=dict(time=row["fwd_bwd_s"] / ref["fwd_bwd_s"],  # memory: None below 1 MiB
                                     memory=row["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] >= 2**20
                                     else None))
    else:
        row.update(matches_reference=None, vs_reference=None)


def run(*, device: str, ops=OPS, mode: str = "full", out: str, reps: int | None = None,
        impls: list[str] | None = None, max_sizes: int | None = None, missing: list[str] = ()) -> int:
    """Runs the suite (the first ``max_sizes`` sizes of each sweep, or all); returns the exit status (1 when a
    fastpref row failed or differs from the reference)."""
    from . import report

    started = time.time()
    dtype = "bfloat16" if device == "cuda" else "float32"
    reps = reps or MODES[mode]
    suites = [importlib.import_module(f"{__package__}.{op}").SUITE for op in ops]
    ui = report.Console()
    ui.header(f"fastpref bench on {device} ({device_name(device)}), {dtype}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads, {mode} sizes, median of {reps}")
    floors = measure_floors(device, dtype, tiny=mode == "tiny")
    ui.header(f"floors: copy {floors['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), "
              f"matmul {floors['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s ({dtype})")
    sweeps = {suite.name: suite.sweep(device, mode)[:max_sizes] for suite in suites}
    plan = []  # (suite, sizes, rows)
    for suite in suites:
        for sizes in sweeps[suite.name]:
            sizes = dict(sizes, dtype=dtype)
            plan.append((suite, sizes, _jobs(suite, device, sizes, set(impls or ()), set(missing))))
    rows = []

    def results(partial: bool) -> dict:
        return dict(schema=SCHEMA, device=device, device_name=device_name(device), mode=mode, reps=reps,
                    cpu_threads=torch.get_num_threads(), versions=versions(), floors=floors,
                    ops={s.name: dict(op=s.op, title=s.title, floor=s.floor, floor_work=s.floor_doc,
                                      x_label=s.x_label, sizes=[dict(z, dtype=dtype) for z in sweeps[s.name]])
                         for s in suites},
                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), rows=rows, partial=partial)

    def write(results: dict) -> str:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        return path

    with ui.progress(sum(r["status"] == "ok" for _, _, rs in plan for r in rs)) as advance:
        for n, (suite, sizes, group) in enumerate(plan):
            if not n or plan[n - 1][0] is not suite:
                ui.header(f"\n{suite.op}: {suite.title}; floor: {suite.floor_doc}")
            work = suite.work(sizes)
            rate = floors["matmul_flops_per_s" if suite.floor == "flops" else "copy_bytes_per_s"]
            ref = group[0] if group[0]["kind"] == "reference" else None
            for row in group:
                row.update(op=suite.name, sizes=sizes, x=suite.x(sizes))
                if row["status"] != "ok":
                    continue
                advance(f"{suite.name} {_size_text(sizes)}: {row['label']}")
                t0 = time.perf_counter()
                result = measure(f"{__package__}.{suite.name}:case", device, reps, fwd_reps=reps,
                                 impl=row["impl"], **sizes)
                row["process_s"] = time.perf_counter() - t0  # start-up, compilation and the measurement
                fwd_work, fwd_bwd_work = result.get("work", work)
                _finish(row, result, ref, (fwd_work / rate, fwd_bwd_work / rate))
            ui.table(f"{suite.op}: {_size_text(sizes)}", group)
            rows += group
            write(results(partial=True))  # a run stopped early still leaves what it measured
    final = results(partial=False)
    os.makedirs(out, exist_ok=True)
    plots = report.plots(final, out)
    final["wall_s"] = time.time() - started
    path = write(final)
    ui.summary(final)
    ui.header(f"wrote {path}" + "".join(f", {p}" for p in plots) + f"  ({final['wall_s']:.0f} s)")
    bad = [r for r in rows if r["kind"] == "fastpref" and (r["status"] == "failed" or r.get("matches_reference") is False)]
    return 1 if bad else 0


def _size_text(sizes: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items() if k != "dtype")
