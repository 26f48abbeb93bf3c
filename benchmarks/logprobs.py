"""linear_logprobs vs the naive path: forward+backward time and peak extra memory.

    python benchmarks/logprobs.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

Each implementation runs in a fresh process so that peak memory is its own: on CUDA
``max_memory_allocated`` over what the inputs hold; on CPU the growth of the peak resident set size
(ru_maxrss) over the size after the inputs were made. "extra" counts everything the op allocates,
including the gradients it returns (hidden and weight: the same for every implementation);
"workspace" is extra minus those gradients. Time is the median of several fwd+bwd calls after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

IMPLS = {
    "naive (logits, log_softmax, gather)": "naive",
    "fastpref auto": "auto",
    "fastpref torch backend": "torch",
}


def _naive(hidden, weight, labels):
    import torch

    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(impl, N, H, V, dtype_name, device, reps, queue):
    import torch

    import fastpref

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, device=device, dtype=dtype) * H**-0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)

    def step():
        if impl == "naive":
            lp = _naive(hidden, weight, labels)
        else:
            lp = fastpref.linear_logprobs(hidden, weight, labels, backend=impl)
        (lp * upstream).sum().backward()
        hidden.grad = weight.grad = None
        return lp.detach()

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    out = step()
    extra = (torch.cuda.max_memory_allocated() - base) if cuda else (_rss_bytes() - base)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    grads = (N * H + V * H) * hidden.element_size()
    queue.put(dict(time_s=statistics.median(times), extra_bytes=extra, workspace_bytes=extra - grads,
                   checksum=float(out.double().sum())))


def measure(impl, N, H, V, dtype, device, reps):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_run, args=(impl, N, H, V, dtype, device, reps, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main(argv=None):
    import torch

    import fastpref

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cuda":
        sizes = [(4096, 2048, 128256)] if args.quick else [(4096, 2048, 128256), (16384, 4096, 128256)]
    else:
        sizes = [(1024, 512, 32000)] if args.quick else [(4096, 1024, 32000)]
    reps = 2 if args.quick else 3
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"linear_logprobs fwd+bwd on {args.device} ({dev_name}), {dtype}, torch {torch.__version__}, "
          f"fastpref {fastpref.__version__}")
    print(f"backends: { {k: v.available for k, v in fastpref.backends().items()} }")
    rows = []
    for N, H, V in sizes:
        print(f"\nN={N} H={H} V={V}")
        print(f"{'implementation':40s} {'time (s)':>10s} {'x naive':>8s} {'extra MiB':>10s} {'x naive':>8s} "
              f"{'workspace MiB':>14s}")
        naive = None
        for label, impl in IMPLS.items():
            r = measure(impl, N, H, V, dtype, args.device, reps)
            naive = naive or r
            rows.append(dict(impl=label, N=N, H=H, V=V, **r))
            print(f"{label:40s} {r['time_s']:10.3f} {r['time_s'] / naive['time_s']:8.2f} "
                  f"{r['extra_bytes'] / 2**20:10.1f} {r['extra_bytes'] / naive['extra_bytes']:8.3f} "
                  f"{r['workspace_bytes'] / 2**20:14.1f}")
            if abs(r["checksum"] - naive["checksum"]) > 1e-3 * abs(naive["checksum"]) + 1e-2:
                raise SystemExit(f"{label}: result differs from the naive path "
                                 f"({r['checksum']} vs {naive['checksum']})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"logprobs-{args.device}{'-quick' if args.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(dict(device=args.device, device_name=dev_name, dtype=dtype, torch=torch.__version__,
                       fastpref=fastpref.__version__, cpu_threads=torch.get_num_threads(), rows=rows), f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
