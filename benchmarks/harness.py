"""The benchmark harness moved into the package (``fastpref/bench/harness.py``) so that ``fastpref bench``
works from a pip install; this re-exports it for the per-op scripts here, which keep their command line:

    python benchmarks/<op>.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

writing ``benchmarks/results/<op>-<device>[-quick].json``.
"""
from __future__ import annotations

import importlib
import os

from fastpref.bench.harness import *  # noqa: F401,F403

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_op(name: str, argv=None) -> None:
    """The command line of ``fastpref/bench/<name>.py``, results in ``benchmarks/results``."""
    importlib.import_module(f"fastpref.bench.{name}").main(argv, out=RESULTS)
