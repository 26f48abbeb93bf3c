"""Compile the Triton kernel variants for sm_80 and sm_90 without a GPU (see fastpref/kernels/triton/_aot.py).

Every log-prob variant and a covering sample of the divergence and pairwise variants (the full cross
products take ~20 minutes on two cores: ``python -m fastpref.kernels.triton._aot --all``).

The interpreter tests check the kernels' math; only a real compile shows register spills, compiler
failures, or lost 128-bit vectorisation.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tools_missing():
    try:
        from triton import knobs
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as exc:
        return f"triton's nvidia backend is not importable: {exc}"
    for tool in ("ptxas", "cuobjdump"):
        if getattr(knobs.nvidia, tool) is None:
            return f"triton's nvidia backend has no usable {tool}"
    return None


def test_all_configs_compile_without_spills(tmp_path):
    reason = _tools_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A cold cache makes every variant really go through ptxas.
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "fastpref.kernels.triton._aot"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    report = json.loads(proc.stdout)
    rows = report["results"]
    assert report["num_failed"] == 0
    assert 0 < report["num_configs"] <= report["num_launchable"]
    assert {r["kernel"] for r in rows} == {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_div_fwd_kernel",
                                           "_div_bwd_kernel", "_pairwise_kernel"}
    for arch in ("sm_80", "sm_90"):
        built = [r for r in rows if r["arch"] == arch and r["ok"]]
        keys = {json.dumps([r["kernel"], r["signature"], r["constexprs"], r["num_warps"]], sort_keys=True)
                for r in built}
        assert len(built) == len(keys) == report["num_configs"], arch
    spills = [r for r in rows if r["local_bytes"] != 0]
    assert not spills, spills
    # Aligned rows (what launch_configs() describes) must keep 16-byte row accesses.
    narrow = [r for r in rows if not r["load128"] or (r["kernel"].endswith("_bwd_kernel") and not r["store128"])]
    assert not narrow, narrow
