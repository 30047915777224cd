"""The CI rule of ``tests/ci_skips.py``: a skip for a missing dependency fails under CI=true, a machine skip stays."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent

INNER = """
import pytest
from ci_skips import skip_machine

def test_needs_data():
    pytest.skip("needs ../shared/data (the shared data folder is absent in this checkout)")

@pytest.mark.skipif(True, reason="needs Debian's chromium")
def test_needs_browser():
    pass

def test_needs_package():
    pytest.importorskip("a_package_that_is_not_installed")

def test_needs_gpu():
    skip_machine("needs a CUDA GPU")

@pytest.mark.skipif(True, reason="machine: needs 2 CUDA GPUs")
def test_needs_two_gpus():
    pass

@pytest.mark.xfail(reason="known", run=False)
def test_expected_failure():
    pass

def test_passes():
    pass
"""


@pytest.mark.parametrize(("ci", "failed", "skipped"), [("true", 3, 2), ("", 0, 5)])
def test_dependency_skips_fail_under_ci(pytester, monkeypatch, ci, failed, skipped):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "ci_skips", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == failed
    assert outcomes.get("skipped", 0) == skipped
    assert outcomes["passed"] == 1 and outcomes["xfailed"] == 1
    if failed:
        result.stdout.fnmatch_lines(["*skipped under CI=true*needs ../shared/data*"])
