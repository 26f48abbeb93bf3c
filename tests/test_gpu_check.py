"""benchmarks/gpu_check's flow without a GPU: the device probe faked, the build and the benchmarks skipped."""
import json
import os
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import SimpleNamespace

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check"


def load():
    loader = SourceFileLoader("gpu_check", str(SCRIPT))
    module = module_from_spec(spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def test_failed_tests_are_run_again_for_their_tracebacks(tmp_path, monkeypatch):
    """A test step stopped at its share never prints xdist's tracebacks: the failures it named run again."""
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_fails():\n    assert 1 == 2, 'the message wanted'\n\n\ndef test_passes():\n    pass\n")
    check = load()
    check.gpu_name = lambda: "Fake GPU"
    check.GPU_TESTS = ()
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--skip-build", "--skip-bench", "--tests", str(sample),
                                      "--out", str(out), "--budget", "200"])
    assert check.main() == 1
    report = json.loads((out / "gpu-check-fake-gpu.json").read_text())
    seen = report["steps"]["tests"]["summary"]["failures_seen"]  # as pytest names it, relative to the repository
    assert len(seen) == 1 and seen[0].endswith("test_sample.py::test_fails"), seen
    again = report["steps"]["failed_tests_again"]
    assert again["status"] == "failed" and "the message wanted" in again["output_tail"]
    assert "output" not in report["steps"]["tests"]  # only the tails go into the report


def test_failed_test_names_in_every_pytest_format():
    check = load()
    text = ("[gw3] [ 40%] FAILED tests/a.py::t[x-1] \n"
            "tests/b.py::u FAILED                                   [ 50%]\n"
            "FAILED tests/c.py::v - AssertionError: no\n"
            "ERROR tests/d.py::w\n"
            "tests/e.py::ok PASSED\n")
    found = {a or b for a, b in check.FAILED_TEST.findall(text)}
    assert found == {"tests/a.py::t[x-1]", "tests/b.py::u", "tests/c.py::v", "tests/d.py::w"}


def test_slow_tests_take_a_step_of_their_own(tmp_path, monkeypatch):
    """With the default selection the slow tests leave the parallel step and run after it, on their own, and
    the parallel step asks for the GPU tests alone (--gpu-only, which tests/conftest.py defines)."""
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_quick():\n    pass\n\n\ndef test_slow():\n    pass\n\n\n"
                      "def test_cpu_side():\n    pass\n")
    (tmp_path / "conftest.py").write_text(
        "def pytest_addoption(parser):\n    parser.addoption('--gpu-only', action='store_true')\n\n\n"
        "def pytest_collection_modifyitems(config, items):\n"
        "    if config.getoption('--gpu-only'):\n"
        "        config.hook.pytest_deselected(items=[i for i in items if i.name == 'test_cpu_side'])\n"
        "        items[:] = [i for i in items if i.name != 'test_cpu_side']\n")
    check = load()
    check.gpu_name = lambda: "Fake GPU"
    # Run from tmp_path, so that the node ids to deselect are the relative ones pytest gives them.
    check.ROOT = tmp_path
    check.GPU_TESTS, check.SLOW_TESTS, check.CPU_SIDE = ("test_sample.py",), ("test_sample.py::test_slow",), ()
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--skip-build", "--skip-bench", "--out", str(out),
                                      "--budget", "200"])
    assert check.main() == 0
    steps = json.loads((out / "gpu-check-fake-gpu.json").read_text())["steps"]
    assert steps["tests"]["summary"]["counts"] == {"passed": 1, "deselected": 2}
    assert steps["slow_tests"]["summary"]["counts"] == {"passed": 1}
    assert "test_slow PASSED" in steps["slow_tests"]["output_tail"]


def test_test_times_sum_up_the_log(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [dict(test="tests/a.py::x", outcome="passed", seconds=2.0, worker="gw0"),
               dict(test="tests/a.py::y", outcome="failed", seconds=1.0, worker="gw1"),
               dict(test="tests/b.py::z", outcome="passed", seconds=5.0, worker="gw0"),
               dict(triton="_div_fwd_kernel", seconds=1.5, cache_hit=False, test="tests/a.py::x", worker="gw0"),
               dict(triton="_div_fwd_kernel", seconds=0.5, cache_hit=False, test="tests/a.py::y", worker="gw1"),
               dict(triton="_div_fwd_kernel", seconds=0.01, cache_hit=True, test="tests/b.py::z", worker="gw0")]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"test": "cut sho')
    times = load().test_times(log, top=2)
    assert times["tests"] == 3 and times["seconds"] == 8.0
    assert times["outcomes"] == {"passed": 2, "failed": 1}
    assert times["by_file"] == {"tests/b.py": 5.0, "tests/a.py": 3.0}
    assert [t["test"] for t in times["slowest"]] == ["tests/b.py::z", "tests/a.py::x"]
    assert times["triton"] == dict(compiles=2, cache_hits=1, seconds=2.0,
                                   by_kernel={"_div_fwd_kernel": dict(compiles=2, seconds=2.0)})


def test_conftest_logs_each_test_and_selects_the_gpu_tests(tmp_path):
    """tests/conftest.py: FASTPREF_TEST_LOG gets a line per test as it ends; --gpu-only keeps the tests that
    name a GPU backend (here the triton ones, and the one marked gpu) and drops the cpu and torch ones."""
    log = tmp_path / "log.jsonl"
    root = SCRIPT.parents[1]
    env = dict(os.environ, FASTPREF_TEST_LOG=str(log))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--gpu-only",
           "tests/test_logprobs.py::test_token_logprobs_dtypes", "tests/test_errors.py::test_backend_errors",
           "tests/test_errors.py::test_empty_input"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ran = {r["test"] for r in records}
    assert ran == {"tests/test_errors.py::test_backend_errors"} | {
        f"tests/test_logprobs.py::test_token_logprobs_dtypes[dtype{i}-triton]" for i in range(3)}, ran
    assert all(r["outcome"] in ("passed", "skipped") and r["seconds"] >= 0 for r in records)


def test_triton_compile_lines(tmp_path, monkeypatch):
    """The conftest's Triton compile listener writes a line per compile, and never raises (a compile would fail)."""
    import conftest

    log = tmp_path / "log.jsonl"
    monkeypatch.setattr(conftest, "_LOG", str(log))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/a.py::x (call)")
    kernel = SimpleNamespace(fn=SimpleNamespace(__name__="_div_fwd_kernel"))
    conftest._triton_compiled(src=kernel, metadata={}, metadata_group={}, times=SimpleNamespace(total=1_500_000),
                              cache_hit=False)
    conftest._triton_compiled(src=kernel, metadata={}, metadata_group={}, times=None, cache_hit=True)
    [line] = log.read_text().splitlines()
    assert json.loads(line) == dict(triton="_div_fwd_kernel", seconds=1.5, cache_hit=False, test="tests/a.py::x",
                                    worker=os.environ.get("PYTEST_XDIST_WORKER", "main"))
