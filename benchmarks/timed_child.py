"""Run a benchmark step in a fresh interpreter and measure how much other processes disturbed it.

Shared by the benchmarks that alternate contenders in subprocesses: on a 2-core machine any other job
distorts every timing, so each run reports ``foreign_cpu``, the share of the machine's CPU time that
processes other than the child used meanwhile.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time


def _cpu_busy_s() -> float:
    """CPU seconds spent by every process on the machine so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(argv: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """(finished process, wall seconds, foreign CPU share 0..1) of running ``argv``."""
    busy, mine, start = _cpu_busy_s(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    foreign = max(0.0, (_cpu_busy_s() - busy) - (_children_cpu_s() - mine))
    return proc, wall, round(foreign / (wall * len(os.sched_getaffinity(0))), 3)
