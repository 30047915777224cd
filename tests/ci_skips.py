"""Under ``CI=true`` a skipped test fails, unless the machine lacks hardware it needs.

A test skips when something it needs is absent: ``../shared/data``, chromium, tcmalloc, a Python
package of the dev extras. On a developer's laptop that is a convenience; in CI it would hide that
the project's own setup did not install what the project needs (a green CI with the browser tests
skipped). So in CI such a skip is reported as a failure, and only a skip whose reason starts with
:data:`MACHINE` (no CUDA GPU, fewer GPUs than the test needs, a machine that may not mount a tmpfs)
stays a skip. The conftest imports the hook; ``tests/test_ci_skips.py`` loads this module as a plugin.
"""

from __future__ import annotations

import os

import pytest

MACHINE = "machine: "  # the reason prefix of a skip about the machine, not about the project's dependencies


def skip_machine(reason: str) -> None:
    """Skip the running test because this machine lacks hardware (or a privilege) it needs."""
    pytest.skip(MACHINE + reason)


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("CI") != "true" or hasattr(report, "wasxfail"):
        return
    reason = _reason(report).removeprefix("Skipped: ")
    if reason.startswith(MACHINE):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, where only a missing GPU or machine privilege may skip a test: {reason}\n"
        "(make setup installs what the project needs; see scripts/setup.sh)"
    )
