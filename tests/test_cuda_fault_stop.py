"""The tests stop at a test after which the CUDA context is lost (conftest.py).

Runs an inner pytest session whose conftest loads this suite's hook and fakes
a GPU whose synchronisation starts failing, as it does after a device-side
fault (an illegal or misaligned address).
"""
from pathlib import Path

from conftest import CUDA_CONTEXT_LOST

pytest_plugins = ["pytester"]

SUITE_CONFTEST = Path(__file__).with_name("conftest.py")

FAKE_GPU = f"""
import importlib.util

import pytest
import torch

spec = importlib.util.spec_from_file_location("suite_conftest", {str(SUITE_CONFTEST)!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_runtest_teardown = suite.pytest_runtest_teardown

state = {{"fault": False}}


@pytest.fixture(autouse=True)
def fake_gpu(monkeypatch):
    def synchronize():
        if state["fault"]:
            raise torch.AcceleratorError("CUDA error: misaligned address\\nmore lines")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
"""

TESTS = """
import pytest
from conftest import state


@pytest.mark.cuda
def test_before():
    pass


def test_on_the_cpu():
    pass


def test_fault():
    state["fault"] = True


@pytest.mark.cuda
def test_after():
    pass
"""


def test_stops_at_the_test_that_lost_the_context(pytester, monkeypatch):
    """Marked or not (the Triton tests run on the GPU unmarked), the test after
    which synchronising fails is the last one."""
    pytester.makeconftest(FAKE_GPU)
    pytester.makepyfile(test_inner=TESTS)
    pytester.makeini("[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n")
    faults = pytester.path / "faults.txt"
    monkeypatch.setenv("GUNN_CUDA_FAULT_FILE", str(faults))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--junitxml=report.xml")
    assert result.ret == CUDA_CONTEXT_LOST
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*the CUDA context was lost in test_inner.py::test_fault "
                                 "(CUDA error: misaligned address)*"])
    assert faults.read_text() == "test_inner.py::test_fault\n"
    assert "test_after" not in (pytester.path / "report.xml").read_text()


def test_runs_on_without_a_fault(pytester, monkeypatch):
    pytester.makeconftest(FAKE_GPU)
    pytester.makepyfile(test_inner=TESTS.replace('state["fault"] = True', "pass"))
    pytester.makeini("[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n")
    monkeypatch.delenv("GUNN_CUDA_FAULT_FILE", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 0
    result.assert_outcomes(passed=4)
