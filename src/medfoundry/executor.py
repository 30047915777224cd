"""Where a stage's parallel tasks run: datatrove's local process pool or a Slurm array job.

Every parallel stage (corpus extract, dedup tasks, shard writing, tokenization) is a list of datatrove
pipeline steps run as ``tasks`` independent tasks. :func:`run_tasks` runs (or submits) the tasks not
yet completed, shows a progress bar fed by datatrove's completion markers (the same for any executor),
and raises :class:`~medfoundry.errors.Pending` while a Slurm job is still working: the same command run
again later continues where the finished tasks left off. A :class:`PeakMemory` step at the end of each
pipeline records every task's peak resident memory in datatrove's stats.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from pydantic import Field, model_validator

from medfoundry.config import StrictModel
from medfoundry.errors import Pending
from medfoundry.io import write_json
from medfoundry.runtime import cpu_count, peak_rss, release_free_memory, reset_peak_rss


class SlurmConfig(StrictModel):
    partition: str
    time: str = Field("04:00:00", description="per-task wall-clock limit, HH:MM:SS")
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2.0, gt=0)
    job_name: str = Field("medfoundry", description="each stage's job is named JOB_NAME-STAGE")
    max_array_launch_parallel: bool = False
    sbatch_args: dict[str, str] = Field(
        default_factory=dict, description="extra #SBATCH directives, e.g. {account: bio}"
    )
    env_command: str | None = Field(
        None, description="shell line run before each task, e.g. 'source .venv/bin/activate'"
    )


class ExecutorConfig(StrictModel):
    """Where a stage's tasks run. ``local``: a process pool on this machine. ``slurm``: one array job
    per stage through datatrove's SlurmPipelineExecutor; the command submits it and returns, and the
    same command run again once the tasks are done (or to resume failed ones) goes on from there."""

    kind: Literal["local", "slurm"] = "local"
    slurm: SlurmConfig | None = None

    @model_validator(mode="after")
    def _slurm_needs_settings(self) -> ExecutorConfig:
        if self.kind == "slurm" and self.slurm is None:
            raise ValueError("executor.slurm (at least its partition) is required when executor.kind is slurm")
        return self


@dataclass
class StageRun:
    """What the tasks of one stage did: datatrove's per-step statistics and the tasks' peak memory."""

    steps: list[dict]
    peak_rss_mb: float
    tasks: int


def make_executor(cfg: ExecutorConfig, pipeline: list, tasks: int, workers: int, logs: Path, name: str):
    """A datatrove executor: a local pool of ``workers`` processes (0 = one per core) or a Slurm array job."""
    if cfg.kind == "slurm":
        from datatrove.executor.slurm import SlurmPipelineExecutor

        slurm = cfg.slurm
        env_command = slurm.env_command or (
            f"source {sys.prefix}/bin/activate" if sys.prefix != sys.base_prefix else None
        )
        return SlurmPipelineExecutor(
            pipeline,
            tasks=tasks,
            time=slurm.time,
            partition=slurm.partition,
            cpus_per_task=slurm.cpus_per_task,
            mem_per_cpu_gb=slurm.mem_per_cpu_gb,
            job_name=f"{slurm.job_name}-{name}",
            sbatch_args=slurm.sbatch_args,
            env_command=env_command,
            logging_dir=str(logs),
            max_array_launch_parallel=slurm.max_array_launch_parallel,
        )
    return _QuietLocalExecutor(
        pipeline, tasks=tasks, workers=min(workers or cpu_count(), tasks), logging_dir=str(logs), start_method="fork"
    )


class _QuietLocalExecutor(LocalPipelineExecutor):
    """Task logs go to the logging folder only: the console gets a progress bar and, on failure, the
    one-line error the CLI prints (datatrove would print each task's log and traceback there)."""

    _devnull = None  # opened once per worker process: loguru keeps writing to the stream it was given

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        if _QuietLocalExecutor._devnull is None:
            _QuietLocalExecutor._devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        with contextlib.redirect_stderr(_QuietLocalExecutor._devnull):
            return super()._run_for_rank(rank, local_rank, node_rank)


class PeakMemory(PipelineStep):
    """Last step of every pipeline: its body runs before the steps it drains start (generators are
    lazy), so it resets the peak there and records the task's peak once they are done."""

    name = "peak memory"
    type = "📊 - STATS"

    def run(self, data, rank: int = 0, world_size: int = 1):
        release_free_memory()  # tasks run one after another in one process when there is one worker
        reset_peak_rss()
        if data is not None:
            yield from data
        peak = peak_rss()
        if peak is not None:
            self.stat_update("peak_rss_mb", value=peak / 2**20)


def run_tasks(
    cfg: ExecutorConfig,
    pipeline: list,
    tasks: int,
    workers: int,
    logs: Path,
    name: str,
    unit: str = "task",
    outputs: list[Path] | None = None,
    weights: list[int] | None = None,
) -> StageRun:
    """Run (or submit) the tasks of stage ``name`` not yet completed; their statistics once all are done.
    ``outputs[rank]``, when given, is a file task ``rank`` leaves: a task whose file is gone (moved or
    removed by a later step of a run that was then killed) runs again despite its completion marker.
    ``weights[rank]``, when given, is what task ``rank`` counts for on the progress bar (its input's bytes,
    with ``unit="B"``), so that one big task among small ones is not one step of many."""
    for rank, path in enumerate(outputs or ()):
        if not path.exists():
            (logs / "completions" / f"{rank:05d}").unlink(missing_ok=True)
    executor = make_executor(cfg, [*pipeline, PeakMemory()], tasks, workers, logs, name)
    active = _active_slurm_job(logs) if cfg.kind == "slurm" else None
    if active and executor.get_incomplete_ranks():
        raise Pending(
            f"slurm job {active} is still running the {name} tasks (logs in {logs}); "
            "run this command again when it is done"
        )
    with progress(logs, tasks, name, unit, weights):
        executor.run()
    if getattr(executor, "job_id", None) not in (None, -1):
        write_json(logs / "slurm_job.json", {"job_id": executor.job_id})
    incomplete = executor.get_incomplete_ranks()
    if incomplete:
        raise Pending(
            f"{len(incomplete)} of {tasks} {name} tasks are not finished "
            f"(slurm job {getattr(executor, 'job_id', '?')}; logs in {logs}). "
            "Run the same command again once they are done: finished tasks are kept, failed ones re-run."
        )
    steps = step_stats(logs, tasks)
    memory = next((s for s in steps if s["name"] == "peak memory"), None)
    peak = memory["stats"].get("peak_rss_mb", 0.0) if memory else 0.0
    return StageRun([s for s in steps if s is not memory], peak, tasks)


@contextlib.contextmanager
def progress(logs: Path, total: int, desc: str, unit: str = "task", weights: list[int] | None = None):
    """A progress bar fed by the executor's completion markers (works for any executor): over tasks, or
    over the ``weights`` of the tasks completed."""
    from datatrove.utils.logging import logger
    from tqdm import tqdm

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    done = threading.Event()
    completions = logs / "completions"

    def count() -> int:
        done = list(completions.glob("*")) if completions.is_dir() else []
        return sum(weights[int(p.name)] for p in done if p.name.isdigit()) if weights else len(done)

    def poll(bar) -> None:
        while not done.wait(0.25):
            bar.update(count() - bar.n)

    with tqdm(
        total=sum(weights) if weights else total, desc=desc, unit=unit, unit_scale=bool(weights), disable=None
    ) as bar:
        thread = threading.Thread(target=poll, args=(bar,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            bar.update(count() - bar.n)


def _active_slurm_job(logs: Path) -> str | None:
    """The job submitted by an earlier run if squeue still lists it (so it is not submitted twice)."""
    record = logs / "slurm_job.json"
    if not record.is_file():
        return None
    job = str(json.loads(record.read_text())["job_id"])
    try:
        listed = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return job if listed.strip() else None


def step_stats(logs: Path, tasks: int) -> list[dict]:
    """Per-step CPU time and counters summed over the tasks' own stats files (written by any executor);
    peaks are the largest over the tasks."""
    steps: dict[str, dict] = {}
    for rank in range(tasks):
        path = logs / "stats" / f"{rank:05d}.json"
        for step in json.loads(path.read_text()) if path.is_file() else []:
            entry = steps.setdefault(step["name"], {"name": step["name"], "time_s": 0.0, "stats": Counter()})
            entry["time_s"] += _total(step["time_stats"])
            for key, value in step["stats"].items():
                if key in _PEAKS:  # one value per task
                    entry["stats"][key] = max(entry["stats"].get(key, 0.0), _total(value))
                else:
                    entry["stats"][key] += _total(value)
    return [dict(s, stats=dict(s["stats"])) for s in steps.values()]


_PEAKS = {"peak_rss_mb"}


def _total(stat) -> float:
    """datatrove saves a metric as a bare number when trivial, else as a dict with its total."""
    return stat.get("total", 0) if isinstance(stat, dict) else stat
