"""Times the Triton row kernels' launch configurations on this GPU, to choose the tables ``_CONFIGS`` in
``fastpref/kernels/triton/logprobs.py`` and ``divergence.py``.

    python benchmarks/tune_row_kernels.py [--N 8192] [--V 128256] [--out FILE.json]

For each (BLOCK_V, num_warps) it times the forward and the backward (of ``token_logprobs`` with entropy and of
``token_divergence``, reverse KL) on random bf16 logits and prints them as fractions of the measured copy
bandwidth (the floors of benchmarks/row_kernels.py). A configuration chosen here must also pass the AOT
spill check (``python -m fastpref.kernels.triton._aot``) before it goes into a table.
"""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

import fastpref
from fastpref.kernels.triton import divergence as tdiv
from fastpref.kernels.triton import logprobs as tlp

CANDIDATES = [(2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    N, V = args.N, args.V
    torch.manual_seed(0)
    x = (torch.randn(N, V, device="cuda") * 2).bfloat16()
    xr = (x.float() + torch.randn(N, V, device="cuda") * 0.5).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda")
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    src = dst = None  # freed before the kernels run
    nbytes = N * V * x.element_size()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s; N={N} V={V} bf16", flush=True)
    rows = []
    for module, op in ((tlp, "token_logprobs"), (tdiv, "token_divergence")):
        saved = module._CONFIGS
        for block_v, num_warps in CANDIDATES:
            module._CONFIGS = ((None, block_v, num_warps),)
            xg = x.detach().requires_grad_()
            if op == "token_logprobs":
                def fwd():
                    return fastpref.token_logprobs(xg, labels, return_entropy=True, backend="triton")
                k_fwd, k_all = 1, 3
            else:
                def fwd():
                    return fastpref.token_divergence(xg, xr, backend="triton")
                k_fwd, k_all = 2, 5
            try:
                with torch.no_grad():
                    t_fwd = do_bench(fwd, warmup=25, rep=200, return_mode="median") * 1e-3

                def step():
                    outs = fwd()
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    torch.autograd.backward([o.sum() for o in outs])
                    xg.grad = None

                t_all = do_bench(step, warmup=25, rep=200, return_mode="median") * 1e-3
            except Exception as exc:  # e.g. out of resources: a row saying so
                print(f"{op:17s} BLOCK_V={block_v:5d} warps={num_warps:2d}  failed: {exc}"[:300], flush=True)
                rows.append(dict(op=op, block_v=block_v, num_warps=num_warps, error=str(exc)[:300]))
                continue
            row = dict(op=op, block_v=block_v, num_warps=num_warps, fwd_s=t_fwd, fwd_bwd_s=t_all,
                       fwd_frac=k_fwd * nbytes / t_fwd / bandwidth, fwd_bwd_frac=k_all * nbytes / t_all / bandwidth)
            rows.append(row)
            print(f"{op:17s} BLOCK_V={block_v:5d} warps={num_warps:2d}  fwd {t_fwd * 1e3:7.3f} ms "
                  f"({row['fwd_frac']:6.1%})  fwd+bwd {t_all * 1e3:7.3f} ms ({row['fwd_bwd_frac']:6.1%})", flush=True)
        module._CONFIGS = saved
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), N=N, V=V, copy_bandwidth=bandwidth, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
