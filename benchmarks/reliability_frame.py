"""The frame of the reliability report: a scenario's :class:`Row`, the run's :class:`Context`, :func:`attempt`
(tries within the time budget) and helpers that start commands in their own process group and kill them.
Scenario groups (``reliability_faults``, ...) build on it; ``reliability_report`` runs them."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ENV = {
    **os.environ,
    "MEDFOUNDRY_NO_TCMALLOC": "1",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


# -- the report's frame: rows, context, groups -------------------------------------------------


@dataclass
class Row:
    """One scenario's outcome. ``survived`` counts tries that ended as required; ``data_lost`` the documents
    lost, duplicated or changed over all tries."""

    group: str
    scenario: str
    tries: int = 0
    survived: int = 0
    injected: int = 0  # faults injected over all tries (kills that landed, damaged files, full disks)
    data_lost: int = 0
    server_errors: int = 0
    seconds: float = 0.0
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.tries - self.survived


@dataclass
class Context:
    quick: bool
    work: Path
    seed: int
    deadline: float  # time.monotonic() after which no new try starts
    only: set[str] | None = None  # scenario names to run (None: all)
    cache: dict = field(default_factory=dict)  # what groups prepare once (reference outputs...)

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def tries(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def wants(self, scenario: str) -> bool:
        return self.only is None or scenario in self.only

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def attempt(ctx: Context, row: Row, tries: int, one: Callable[[int], tuple[bool, int, str]]) -> Row:
    """Run ``one(i) -> (survived, documents lost, problem or note)`` up to ``tries`` times, within the budget."""
    start = time.monotonic()
    for i in range(tries):
        if ctx.time_left() <= 0:
            row.detail = (row.detail + "; " if row.detail else "") + f"time budget reached after {i} of {tries} tries"
            break
        try:
            ok, lost, note = one(i)
        except Exception as exc:  # a scenario's own crash is a failed try, reported, not a crashed report
            ok, lost, note = False, 0, f"{type(exc).__name__}: {exc}"
        row.tries += 1
        row.survived += ok
        row.data_lost += lost
        if not ok:
            row.problems.append(f"try {i + 1}: {note}")
            ctx.log(f"  {row.scenario}: try {i + 1} FAILED: {note}")
        else:
            ctx.log(f"  {row.scenario}: try {i + 1} ok{': ' + note if note else ''}")
    row.seconds = round(time.monotonic() - start, 1)
    return row


Scenarios = dict[str, tuple[Callable[[Context, int], Row], int, int]]  # name -> (scenario, quick tries, full tries)


def run_scenarios(ctx: Context, group: str, scenarios: Scenarios) -> list[Row]:
    """The rows of the ``scenarios`` the run wants, each with its number of tries."""
    rows = []
    for name, (scenario, quick, full) in scenarios.items():
        if ctx.wants(name):
            ctx.log(f"{group}: {name}")
            rows.append(scenario(ctx, ctx.tries(quick, full)))
    return rows


# -- running commands and killing them ---------------------------------------------------------


def medfoundry(*args: str) -> list[str]:
    return [sys.executable, "-m", "medfoundry", *args]


def start(argv: list[str], log: Path, preexec: Callable | None = None) -> subprocess.Popen:
    """``argv`` in its own session (so its whole process group can be killed), stderr to ``log``."""
    with open(log, "ab") as err:
        return subprocess.Popen(
            argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, preexec_fn=preexec
        )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_with_kills(argv: list[str], log: Path, delays: list[float], timeout: float = 600) -> tuple[int, list[float]]:
    """Start ``argv``, SIGKILL its process group after each delay (starting it again each time), then let
    a last start run to completion. Returns (its return code, the delays that did kill a running process)."""
    landed = []
    for delay in delays:
        proc = start(argv, log)
        try:
            return proc.wait(timeout=delay), landed  # ended before the kill: nothing more to interrupt
        except subprocess.TimeoutExpired:
            kill_group(proc)
            landed.append(round(delay, 3))
    proc = start(argv, log)
    try:
        return proc.wait(timeout=timeout), landed
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return -1, landed


def kill_during(
    argv: list[str],
    log: Path,
    moment: Callable[[], bool],
    delay: float = 0.0,
    timeout: float = 600,
    poll: float = 0.001,
) -> bool:
    """Start ``argv`` and SIGKILL its process group ``delay`` seconds after ``moment()`` first holds.
    Returns whether it was killed (False: it ended first)."""
    proc = start(argv, log)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if moment():
            if delay:
                time.sleep(delay)
            if proc.poll() is not None:
                return False
            kill_group(proc)
            return True
        time.sleep(poll)
    if proc.poll() is None:
        kill_group(proc)
    return False


def tail(log: Path, chars: int = 600) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return " ".join(text[-chars:].split())


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders a finished stage must not leave behind."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith((".tmp", ".deleting", ".old")) or p.name.startswith(".staging-")
    )
