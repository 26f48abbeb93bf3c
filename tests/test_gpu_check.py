"""benchmarks/gpu_check's flow without a GPU: the device probe faked, the build and the benchmarks skipped."""
import json
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

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
    """With the default selection the slow tests leave the parallel step and run after it, on their own."""
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_quick():\n    pass\n\n\ndef test_slow():\n    pass\n")
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
    assert steps["tests"]["summary"]["counts"] == {"passed": 1, "deselected": 1}
    assert steps["slow_tests"]["summary"]["counts"] == {"passed": 1}
    assert "test_slow PASSED" in steps["slow_tests"]["output_tail"]
