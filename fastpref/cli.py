"""The ``fastpref`` command line: ``fastpref bench [--device cpu|cuda] [--ops ...] [--quick] [--out DIR]`` and
``fastpref train <trainer> [--config FILE.yaml] [--field value ...]`` (``fastpref/trainers/cli.py``) and
``fastpref demo [--out DIR] [--quick]`` (``fastpref/trainers/demo/cli.py``)."""
from __future__ import annotations

import argparse
import sys


def _bench_parser(sub) -> None:
    from .bench import OPS

    p = sub.add_parser(
        "bench", help="benchmark every op against eager PyTorch, torch.compile and the installed peers",
        description="Size sweep of each op family over every fastpref backend, eager PyTorch written the way "
                    "TRL does it, its torch.compile, and Liger-Kernel / Cut Cross-Entropy where installed: "
                    "median forward and forward+backward time, peak memory, a check against the eager result "
                    "and the time over the hardware floor (measured copy bandwidth / matmul rate). Each "
                    "implementation runs in a fresh process. Writes results.json and <op>.png to --out.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), metavar="OP",
                   help=f"op families to run (default: all of {', '.join(OPS)})")
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on a CPU")
    p.add_argument("--out", default=None, help="output folder (default: ./fastpref-bench-<device>[-quick])")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 3)")
    p.add_argument("--sizes", type=int, default=None, metavar="K",
                   help="only the first K sizes of each op's sweep (the smallest)")
    p.add_argument("--impls", nargs="+", default=None, metavar="IMPL",
                   help="only these implementations (eager, compile, cce, liger, kl_div, or fastpref backends "
                        "cpu, torch, triton); the eager reference always runs")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds, not minutes
    p.add_argument("--pretend-missing", nargs="+", default=[], help=argparse.SUPPRESS)  # tests: absent peers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastpref", description="fastpref command line")
    sub = ap.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    from .trainers.cli import add_train_parser

    add_train_parser(sub)
    from .trainers.demo.cli import add_demo_parser

    add_demo_parser(sub)
    # `train` takes any config field as a flag (--learning_rate 1e-4): its parser cannot list them all.
    args, extra = ap.parse_known_args(argv)
    if extra and args.command != "train":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":
        from .trainers.cli import run as train

        return train(args, extra)
    if args.command == "demo":
        from .trainers.demo.cli import run as demo

        return demo(args)
    if args.command == "bench":
        import torch

        from .bench.suite import run

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device visible to torch")
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        out = args.out or f"fastpref-bench-{device}{'' if mode == 'full' else '-' + mode}"
        if args.sizes is not None and args.sizes < 1:
            ap.error("--sizes must be at least 1")
        return run(device=device, ops=args.ops, mode=mode, out=out, reps=args.reps, impls=args.impls,
                   max_sizes=args.sizes, missing=args.pretend_missing)
    return 2


if __name__ == "__main__":
    sys.exit(main())
