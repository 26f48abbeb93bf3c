"""Times the Triton row kernels' launch configurations on this GPU, to choose the tables ``_CONFIGS`` in
``fastpref/kernels/triton/logprobs.py`` and ``divergence.py``.

    python benchmarks/tune_row_kernels.py [--N 8192] [--V 128256] [--out FILE.json]

For each (BLOCK_V, num_warps) it times the forward and the backward of benchmarks/row_kernels.py's triton cases
(``token_logprobs`` with entropy, ``token_divergence`` reverse KL; labels given, none ignored) on its random
bf16 logits and prints them as fractions of the measured copy bandwidth (that script's floors). A configuration chosen here must also pass the AOT
spill check (``python -m fastpref.kernels.triton._aot``) before it goes into a table.
"""
from __future__ import annotations

import argparse
import json

import torch

from fastpref.kernels.triton import divergence as tdiv
from fastpref.kernels.triton import logprobs as tlp
from row_kernels import bare_kernels, cases, copy_bandwidth, floor_bytes, inputs, time_op, timer  # run as a script: benchmarks/ on sys.path

CANDIDATES = [(2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)]
TABLES = {"token_logprobs": tlp, "token_divergence": tdiv}  # the module whose _CONFIGS each op launches with


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    N, V = args.N, args.V
    measure = timer("cuda", warmup=25, rep=200)
    bandwidth = copy_bandwidth("cuda", 2**31, measure)  # before the inputs: the copy buffers are freed first
    x, xr, labels = inputs(N, V, "cuda", torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s; N={N} V={V} bf16", flush=True)
    rows = []
    for op, _, forward, _ in cases(["triton"]):
        fwd_bytes, all_bytes = floor_bytes(op, N, V, N, x.element_size())  # no ignored rows here
        kernel = bare_kernels(op, "triton")[0]
        module = TABLES[op]
        saved = module._CONFIGS
        for block_v, num_warps in CANDIDATES:
            module._CONFIGS = ((None, block_v, num_warps),)
            try:
                t_fwd, t_all = time_op(forward, x, xr, labels, measure)
                t_kernel = measure(lambda: kernel(x, xr, labels))
            except Exception as exc:  # e.g. out of resources: a row saying so
                print(f"{op:17s} BLOCK_V={block_v:5d} warps={num_warps:2d}  failed: {exc}"[:300], flush=True)
                rows.append(dict(op=op, block_v=block_v, num_warps=num_warps, error=str(exc)[:300]))
                continue
            row = dict(op=op, block_v=block_v, num_warps=num_warps, fwd_s=t_fwd, fwd_bwd_s=t_all,
                       fwd_frac=fwd_bytes / t_fwd / bandwidth, fwd_bwd_frac=all_bytes / t_all / bandwidth,
                       kernel_fwd_s=t_kernel, kernel_fwd_frac=fwd_bytes / t_kernel / bandwidth)
            rows.append(row)
            print(f"{op:17s} BLOCK_V={block_v:5d} warps={num_warps:2d}  fwd {t_fwd * 1e3:7.3f} ms "
                  f"({row['fwd_frac']:6.1%})  fwd+bwd {t_all * 1e3:7.3f} ms ({row['fwd_bwd_frac']:6.1%})  "
                  f"kernel fwd {t_kernel * 1e3:7.3f} ms ({row['kernel_fwd_frac']:6.1%})", flush=True)
        module._CONFIGS = saved
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), N=N, V=V, copy_bandwidth=bandwidth, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
