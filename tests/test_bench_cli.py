"""``fastpref bench`` end to end at tiny sizes (a hidden ``--tiny`` mode): the JSON schema, the plots, and
the rows of peers that cannot run here."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import fastpref
from fastpref.bench import OPS, Impl
from fastpref.bench.suite import SCHEMA, peer_status



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run, shared: linear_logprobs at two tiny sizes, the eager reference, Cut Cross-Entropy (made to
    look absent), Liger-Kernel (GPU-only: "needs CUDA" on CPU) and the fastpref cpu backend."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    # The fastpref this test imported (installed or the source tree), so both sides see the same backends.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastpref.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    # Run from a folder holding a decoy fastpref, as `fastpref bench` is run from a source checkout after a
    # pip install: the measuring processes must import the parent's fastpref, not the one in the folder.
    # The parent starts like the console script, from a script elsewhere (so not from the folder itself).
    decoy = tmp_path_factory.mktemp("checkout")
    (decoy / "fastpref").mkdir()
    (decoy / "fastpref" / "__init__.py").write_text("DECOY = True  # importable: a fork server would keep it\n")
    script = tmp_path_factory.mktemp("bin") / "fastpref_bench.py"
    script.write_text("import sys\nfrom fastpref.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n")
    cmd = [sys.executable, str(script), "bench", "--tiny", "--device", "cpu", "--ops", "logprobs",
           "--impls", "eager", "cce", "liger", "cpu", "--pretend-missing", "cut_cross_entropy", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(decoy), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


def test_results_json_schema(tiny_run):
    _, res, _ = tiny_run
    assert res["schema"] == SCHEMA
    assert res["device"] == "cpu" and isinstance(res["device_name"], str) and res["device_name"]
    assert res["mode"] == "tiny" and res["wall_s"] > 0
    assert res["versions"]["fastpref"] == fastpref.__version__ and res["versions"]["torch"]
    assert res["floors"]["copy_bytes_per_s"] > 0 and res["floors"]["matmul_flops_per_s"] > 0
    assert list(res["ops"]) == ["logprobs"]
    info = res["ops"]["logprobs"]
    assert info["op"] == "linear_logprobs" and info["floor"] == "flops" and info["floor_work"]
    assert len(info["sizes"]) == 2 and all(s["dtype"] == "float32" for s in info["sizes"])
    for row in res["rows"]:
        assert {"op", "impl", "label", "name", "kind", "sizes", "x", "status", "reason"} <= set(row)
        assert row["sizes"] in info["sizes"]
        if row["status"] == "ok":
            assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0 and row["peak_bytes"] >= 0
            assert row["floor_s"]["fwd_bwd"] > row["floor_s"]["fwd"] > 0
            assert row["x_floor"]["fwd_bwd"] == pytest.approx(row["fwd_bwd_s"] / row["floor_s"]["fwd_bwd"])
            assert row["matches_reference"] is True, row
            assert row["vs_reference"]["time"] > 0


def test_rows_per_implementation(tiny_run):
    _, res, stdout = tiny_run
    for sizes in res["ops"]["logprobs"]["sizes"]:
        rows = {r["impl"]: r for r in res["rows"] if r["sizes"] == sizes}
        assert set(rows) == {"eager", "cce", "liger", "cpu"}  # --impls left out compile and torch
        assert rows["eager"]["kind"] == "reference" and rows["eager"]["status"] == "ok"
        assert rows["cce"]["status"] == "not installed"
        # Liger's logprobs peer is a Triton kernel: "needs CUDA" here, unless it is not installed at all.
        liger = importlib.util.find_spec("liger_kernel") is not None
        assert rows["liger"]["status"] == ("needs CUDA" if liger else "not installed")
        cpu = fastpref.backends()["cpu"]
        assert rows["cpu"]["kind"] == "fastpref"
        assert rows["cpu"]["status"] == ("ok" if cpu.available else "unavailable")
    assert "not installed" in stdout


def test_plots_written(tiny_run):
    out, _, _ = tiny_run
    with open(out / "logprobs.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_peer_status():
    peer = Impl("x", "a peer", "peer", needs="surely_not_a_module_here")
    assert peer_status(peer, "cpu", set()) == ("not installed", "pip install surely-not-a-module-here")
    assert peer_status(Impl("y", "b", "b", needs="torch"), "cpu", {"torch"})[0] == "not installed"
    assert peer_status(Impl("z", "c", "c", cuda_only=True), "cpu", set())[0] == "needs CUDA"
    assert peer_status(Impl("z", "c", "c", cuda_only=True), "cuda", set()) == ("ok", None)


def test_every_op_has_a_suite():
    for op in OPS:
        suite = importlib.import_module(f"fastpref.bench.{op}").SUITE
        assert suite.name == op and suite.peers[0].key == "eager"
        for mode in ("full", "quick", "tiny"):
            for device in ("cpu", "cuda"):
                sweep = suite.sweep(device, mode)
                assert len(sweep) >= 2
                for s in sweep:
                    fwd, fwd_bwd = suite.work(dict(s, dtype="float32"))
                    assert fwd_bwd > fwd > 0


def test_sizes_keeps_the_first_of_each_sweep(tmp_path):
    """--sizes 1: the smallest size of each op alone (benchmarks/gpu_check's quick look at every op)."""
    from fastpref.cli import main

    assert main(["bench", "--tiny", "--device", "cpu", "--ops", "grpo", "dpo", "--impls", "eager", "--sizes", "1",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for op in ("grpo", "dpo"):
        first = importlib.import_module(f"fastpref.bench.{op}").SUITE.sweep("cpu", "tiny")[0]
        assert res["ops"][op]["sizes"] == [dict(first, dtype="float32")]
        assert [r["sizes"] for r in res["rows"] if r["op"] == op] == [dict(first, dtype="float32")]
    with pytest.raises(SystemExit):
        main(["bench", "--tiny", "--sizes", "0"])
