"""The row kernels against the memory floor: token_logprobs (+ entropy) and token_divergence, forward and
forward+backward, on every fastpref backend usable here and the eager PyTorch path, as a fraction of the
measured copy bandwidth (issue 6's goals: >= 85 % forward, >= 80 % forward+backward).

    python benchmarks/row_kernels.py [--device cuda] [--tiny] [--out FILE.json]

Floors (the fewest bytes each step must move, over the measured copy bandwidth, read + written):
  token_logprobs    forward K V s (read the kept rows' logits); fwd+bwd (2 K + N) V s (read twice, write every
                    row's gradient, zeros for ignored rows)
  token_divergence  forward 2 K V s (logits and reference); fwd+bwd (4 K + N) V s; the same floors for the
                    two-pass divergences (js, alpha, tv, hellinger: bare kernels only), whose second pass re-reads
                    the rows unless they are still in L2
with s the element size, N rows of which K are kept (1 in 7 is ignored, as in a batch with prompt tokens; an
ignored row is never read); the per-row outputs are negligible. Each op is timed through the public API (which
checks the labels' range on the host: one small reduction and a device sync per call) and, for the forward,
as the bare kernels (``fastpref.kernels.<backend>``: no label check, no autograd): the difference is the
API's cost, mostly the check's device sync, which leaves the GPU idle while the host prepares the launch.
Times are medians of CUDA-event timings (``triton.testing.do_bench``) on a GPU, of wall-clock repetitions on
CPU. The inputs are random (never zeros).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastpref
from fastpref._backends import row_kernels
from fastpref.divergences import REGISTRY


def timer(device, warmup=50, rep=300):
    """fn -> seconds: the median of CUDA-event timings (``warmup`` and ``rep`` in ms, do_bench's) on a GPU, of
    three wall-clock runs after one warm-up on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e-3

    def cpu_timer(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cpu_timer


def copy_bandwidth(device, nbytes, measure):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / measure(lambda: dst.copy_(src))


def eager_logprobs(x, labels):
    keep = labels != -100
    logp = torch.log_softmax(x.float(), dim=-1)
    lp = logp.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    return lp * keep, -(logp.exp() * logp).sum(-1) * keep


def eager_divergence(x, xr, labels):
    logp, logq = torch.log_softmax(x.float(), -1), torch.log_softmax(xr.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1) * (labels != -100)


SIZES = [(8192, 128256), (32768, 32000)]  # (N, V): a Llama-3 vocabulary, and a Llama-2 one with 4x the rows
# Per op, (kept-row reads, all-row writes) per element of the forward and of forward+backward: the floors above.
FLOORS = {"token_logprobs": ((1, 0), (2, 1)), "token_divergence": ((2, 0), (4, 1))}


def floor_bytes(op, N, V, kept, elem):
    """[forward, forward+backward] bytes of ``op``'s floor for N rows of V elements of ``elem`` bytes, ``kept``
    of them read."""
    return [(r * kept + w * N) * V * elem for r, w in FLOORS[op]]


def cases(impls):
    """(op, impl, forward(x, xr, labels) -> outputs, FLOORS[op])."""
    for impl in impls:
        if impl == "eager":
            lp, dv = eager_logprobs, eager_divergence
        else:
            def lp(x, labels, impl=impl):
                return fastpref.token_logprobs(x, labels, return_entropy=True, backend=impl)

            def dv(x, xr, labels, impl=impl):
                return fastpref.token_divergence(x, xr, divergence="reverse_kl", labels=labels, backend=impl)
        yield "token_logprobs", impl, (lambda x, xr, y, f=lp: f(x, y)), FLOORS["token_logprobs"]
        yield "token_divergence", impl, dv, FLOORS["token_divergence"]


def bare_kernels(op, impl, div="reverse_kl"):
    """(forward, forward+backward) closures over the backend's kernels alone (``fastpref.kernels.<impl>``: no
    label check, no autograd; the backward into a preallocated gradient of the logits), or None for eager and
    the torch path. ``div``: token_divergence's divergence (js and alpha at 0.5)."""
    if impl not in ("triton", "cuda", "cpu"):
        return None
    mod = row_kernels(impl, "logprobs" if op == "token_logprobs" else "divergence")
    if op == "token_logprobs":
        def fwd(x, xr, y):
            return mod.row_forward(x, y, with_entropy=True)

        def fwd_bwd(x, xr, y, out):
            _, lse, ent = fwd(x, xr, y)
            ones = torch.ones_like(lse)
            mod.row_backward(x, y, lse, ent, ones, ones, out)
    else:
        kw = dict(div_id=REGISTRY[div].kernel_id, param=0.5 if div in ("js", "alpha") else 0.0)

        def fwd(x, xr, y):
            return mod.div_forward(x, xr, y, **kw)

        def fwd_bwd(x, xr, y, out):
            _, lse, lse_r, s_a, s_b = fwd(x, xr, y)
            mod.div_backward(x, xr, y, lse, lse_r, s_a, s_b, torch.ones_like(lse), out, None, **kw)
    return fwd, fwd_bwd


# The divergences whose forward takes two passes (the lse's, then the sums), timed as bare kernels only; their
# floor is still one read of both rows, which the second pass re-reads unless they are still in L2.
TWO_PASS = ("js", "alpha", "tv", "hellinger")


def inputs(N, V, device, dtype, ignore_every=None):
    """Random policy and reference logits [N, V] (never zeros) and labels, every ``ignore_every``-th ignored."""
    torch.manual_seed(0)
    x = (torch.randn(N, V, device=device) * 2).to(dtype)
    xr = (x.float() + torch.randn(N, V, device=device) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    if ignore_every:
        labels[::ignore_every] = -100
    return x, xr, labels


def time_op(forward, x, xr, labels, measure):
    """(forward, forward+backward) seconds of ``forward(x, xr, labels)``, the backward into the logits x."""
    xg = x.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            forward(x, xr, labels)

    def fwd_bwd():
        outs = forward(xg, xr, labels)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward([o.sum() for o in outs])
        xg.grad = None

    return measure(fwd), measure(fwd_bwd)


def measured_row(op, label, impl, forward, kernels, x, xr, labels, measure, bandwidth):
    """One row of the table, printed as it comes: ``forward`` through autograd (``time_op``; None: not timed)
    and the bare ``kernels`` (``bare_kernels``; None: none), in seconds and as fractions of the copy bandwidth
    of ``op``'s floor. A backend that fails is a row saying so, not the end of the run."""
    N, V = x.shape
    kept = int((labels != -100).sum())
    nbytes = floor_bytes(op, N, V, kept, x.element_size())
    row = dict(op=label, impl=impl, N=N, V=V, kept=kept, dtype=str(x.dtype).split(".")[-1])
    text = ""
    try:
        if forward is not None:
            row["fwd_s"], row["fwd_bwd_s"] = time_op(forward, x, xr, labels, measure)
            row["fwd_bw_frac"], row["fwd_bwd_bw_frac"] = (b / t / bandwidth for b, t in
                                                          zip(nbytes, (row["fwd_s"], row["fwd_bwd_s"])))
            text += (f"  fwd {row['fwd_s'] * 1e3:8.3f} ms ({row['fwd_bw_frac']:6.1%} of copy)  fwd+bwd "
                     f"{row['fwd_bwd_s'] * 1e3:8.3f} ms ({row['fwd_bwd_bw_frac']:6.1%})")
        if kernels is not None:
            out = torch.empty_like(x)
            row["kernel_fwd_s"] = measure(lambda: kernels[0](x, xr, labels))
            row["kernel_fwd_bwd_s"] = measure(lambda: kernels[1](x, xr, labels, out))
            del out
            row["kernel_fwd_bw_frac"], row["kernel_fwd_bwd_bw_frac"] = (
                b / t / bandwidth for b, t in zip(nbytes, (row["kernel_fwd_s"], row["kernel_fwd_bwd_s"])))
            text += (f"  kernels: fwd {row['kernel_fwd_s'] * 1e3:7.3f} ms ({row['kernel_fwd_bw_frac']:6.1%}) "
                     f"fwd+bwd {row['kernel_fwd_bwd_s'] * 1e3:7.3f} ms ({row['kernel_fwd_bwd_bw_frac']:6.1%})")
        row["status"] = "ok"
    except Exception as exc:
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        text = f"  FAILED {row['reason']}"
    print(f"{label:27s} {impl:7s} N={N:6d} V={V:6d}{text}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small sizes, for a dry run of this script")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    device = args.device
    measure = timer(device)
    sizes = [(64, 3001)] if args.tiny else SIZES
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device, 2**20 if args.tiny else 2**31, measure)
    infos = fastpref.backends()
    impls = ["eager"] + [n for n in ("triton", "cuda", "cpu", "torch") if infos[n].available
                         and not (n == "cpu" and device != "cpu") and not (n == "cuda" and device != "cuda")]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written); {dtype}; impls {impls}", flush=True)
    rows = []
    for N, V in sizes:
        x, xr, labels = inputs(N, V, device, dtype, ignore_every=7)
        for op, impl, forward, _ in cases(impls):
            rows.append(measured_row(op, op, impl, forward, bare_kernels(op, impl), x, xr, labels, measure, bandwidth))
        for div in TWO_PASS:
            for impl in [i for i in impls if i in ("triton", "cuda", "cpu")]:
                rows.append(measured_row("token_divergence", f"token_divergence[{div}]", impl, None,
                                         bare_kernels("token_divergence", impl, div), x, xr, labels, measure,
                                         bandwidth))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, copy_bandwidth=bandwidth, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
