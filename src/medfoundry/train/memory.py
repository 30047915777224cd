"""Peak memory and time by phase of a run, per process: what sizing a run for more processes needs.

Phases: ``init`` (process start to a built, sharded model), ``resume`` (reading a checkpoint),
``train`` (steps and validation), ``save`` (checkpoints) and ``export``. The host peak is Linux's
high-water mark of resident memory (``VmHWM``), reset at the start of each phase by writing ``5`` to
``/proc/self/clear_refs``; on GPU the device peak (``max_memory_allocated``) is kept per phase too.
Process 0 writes every process's peaks into the run's ``memory.json``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from medfoundry.io import write_json
from medfoundry.runtime import peak_rss, reset_peak_rss
from medfoundry.train import distributed


class PhaseMemory:
    """Peaks and seconds by phase for this process."""

    def __init__(self, device: str):
        self.device = device
        self.peak_rss: dict[str, int] = {}
        self.peak_device: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def close(self, name: str) -> None:
        """Record the peak since the last reset as phase ``name`` (``init``: since the process started)."""
        peak = peak_rss()
        if peak is not None:
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), peak)
        if self.device.startswith("cuda"):
            self.peak_device[name] = max(self.peak_device.get(name, 0), torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_peak_rss()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Measure the body as (part of) phase ``name``."""
        reset_peak_rss()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.count[name] = self.count.get(name, 0) + 1
            self.close(name)

    def report(self) -> dict:
        report = {"peak_rss_bytes": self.peak_rss, "seconds": self.seconds, "count": self.count}
        return {**report, "peak_device_bytes": self.peak_device} if self.peak_device else report

    def write(self, path: Path, d: distributed.Dist) -> None:
        """Gather every process's report; process 0 writes them (a collective)."""
        reports = distributed.gather_objects(self.report(), d)
        if d.is_main:
            write_json(path, {"world_size": d.world_size, "ranks": reports})
