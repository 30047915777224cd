"""Starting a training stage on several processes or nodes: ``torch.distributed.run`` (torchrun) on this
machine, or a Slurm job whose every node runs torchrun. ``medfoundry run`` (a recipe's ``distributed:``
section) and ``medfoundry pretrain/finetune --nproc-per-node N`` both build their commands here.

- :class:`LaunchConfig`: how many processes on how many nodes, and the launcher (``torchrun`` or ``slurm``,
  with :class:`SlurmLaunchConfig`); validated before any work.
- :func:`torchrun_command` and :func:`run_torchrun`: ``python -m torch.distributed.run ... -m medfoundry
  pretrain CONFIG``, its output streamed as it comes; a failure raises :class:`LaunchFailed` with torchrun's
  exit code, and an interrupt (Ctrl-C, SIGTERM) of this process stops torchrun, which stops its workers.
- :func:`sbatch_script`, :func:`submit` and :func:`job_state`: the batch script (one task per node, each
  running torchrun, the rendezvous on the job's first node), its submission with ``sbatch --parsable``,
  and whether the job is still queued or running (``squeue``) or how it ended (``sacct``, when there).

The training processes are the stage's own command: the first writes the stage's manifest, as a single
process does, and that manifest is what tells the caller the stage is done.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from medfoundry.config import StrictModel
from medfoundry.errors import ConfigError, MedfoundryError, Pending

TORCHRUN_ENV = ("WORLD_SIZE", "LOCAL_RANK")  # set by torchrun in every worker
RDZV_PORT = 29500


class SlurmLaunchConfig(StrictModel):
    """The job's ``#SBATCH`` settings; unset ones are left to the cluster's defaults."""

    partition: str | None = None
    account: str | None = None
    time: str | None = Field(None, description="wall-clock limit, [D-]HH:MM:SS; training resumes in a new job")
    gpus_per_node: int | None = Field(None, ge=1, description="GPUs to allocate on each node; unset on CPU nodes")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for each node's task (all its processes)")
    job_name: str | None = Field(None, description="default medfoundry-<recipe>-<stage>")
    sbatch_args: dict[str, str] = Field(
        default_factory=dict, description="extra #SBATCH directives, e.g. {qos: high, mem: '0', exclusive: ''}"
    )
    env_command: str | None = Field(
        None, description="shell line run before srun, e.g. 'module load cuda/12.4'; the venv is activated anyway"
    )
    rdzv_port: int = Field(RDZV_PORT, ge=1, le=65535, description="the rendezvous port on the job's first node")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", value):
            raise ValueError(f"expected [D-]HH:MM:SS, e.g. 2-00:00:00 for two days, got {value!r}")
        return value

    @field_validator("sbatch_args")
    @classmethod
    def _directives(cls, args: dict[str, str]) -> dict[str, str]:
        for name, value in args.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or "\n" in str(value):
                raise ValueError(f"{name!r}: an #SBATCH option name without dashes (e.g. qos), and a one-line value")
        return args


class LaunchConfig(StrictModel):
    """How a training stage starts: ``nproc_per_node`` processes on each of ``nnodes`` nodes, by torchrun
    from this command, or by a Slurm job it submits."""

    launcher: Literal["torchrun", "slurm"] = "torchrun"
    nproc_per_node: int = Field(1, ge=1, description="training processes on each node (one per GPU)")
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = Field(
        None,
        validate_default=True,
        description="HOST:PORT of the rendezvous (on the first node) when torchrun spans several nodes",
    )
    slurm: SlurmLaunchConfig | None = Field(
        None, validate_default=True, description="the job's settings when launcher is slurm"
    )

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        launcher, nnodes = info.data.get("launcher"), info.data.get("nnodes", 1)
        if value is None:
            if launcher == "torchrun" and nnodes > 1:
                raise ValueError(
                    f"required when nnodes is {nnodes} with launcher torchrun: HOST:PORT of the first node, the "
                    "same on every node (or launcher: slurm, which finds it in the job)"
                )
            return value
        if launcher == "slurm":
            raise ValueError(
                "not used with launcher slurm (the rendezvous is on the job's first node, at slurm.rdzv_port); "
                "remove it"
            )
        if not re.fullmatch(r"[^\s:/\[\]]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", value):
            raise ValueError("expected HOST:PORT, e.g. node001:29500")
        return value

    @field_validator("slurm")
    @classmethod
    def _slurm(cls, value: SlurmLaunchConfig | None, info: ValidationInfo) -> SlurmLaunchConfig | None:
        if value is None:
            return value
        if info.data.get("launcher") == "torchrun":
            raise ValueError("only used with launcher: slurm (set launcher: slurm, or remove this section)")
        nproc = info.data.get("nproc_per_node", 1)
        if value.gpus_per_node is not None and nproc > value.gpus_per_node:
            raise ValueError(
                f"gpus_per_node ({value.gpus_per_node}) is less than nproc_per_node ({nproc}): one training "
                "process per GPU"
            )
        return value

    @property
    def processes(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def in_process(self) -> bool:
        """One process on this node and no scheduler: the stage runs in the calling process."""
        return self.launcher == "torchrun" and self.processes == 1

    def describe(self) -> str:
        nodes = f"{self.nnodes} nodes x " if self.nnodes > 1 else ""
        return f"{nodes}{self.nproc_per_node} process{'es' if self.nproc_per_node > 1 else ''}"


class LaunchFailed(MedfoundryError):
    """torchrun (or sbatch) exited with an error; ``exit_code`` is its exit code (128 + N for signal N)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of torchrun's workers (so it must not launch torchrun again)."""
    env = os.environ if env is None else env
    return any(name in env for name in TORCHRUN_ENV)


# ---------------------------------------------------------------------------------------------- torchrun


def torchrun_command(
    args: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int | str = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    python: str | None = None,
) -> list[str]:
    """``python -m torch.distributed.run ... -m medfoundry ARGS``. One node without an endpoint uses
    ``--standalone`` (a rendezvous on a free local port: two runs on one machine do not collide); otherwise
    the c10d rendezvous at ``rdzv_endpoint``. ``nnodes``, ``rdzv_endpoint`` and ``rdzv_id`` may be shell
    expansions (the Slurm script's ``$SLURM_NNODES``)."""
    command = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        command += ["--standalone"]
    else:
        if rdzv_endpoint is None:
            raise ConfigError(f"a rendezvous endpoint (HOST:PORT) is needed for {nnodes} nodes")
        command += [
            "--nnodes",
            nnodes if isinstance(nnodes, str) else str(nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
        ]
        if rdzv_id is not None:
            command += ["--rdzv-id", rdzv_id]
    return [*command, "--nproc-per-node", str(nproc_per_node), "-m", "medfoundry", *args]


def launch_torchrun(args: Sequence[str], launch: LaunchConfig) -> list[str]:
    """The torchrun command of ``launch`` (launcher torchrun) for ``medfoundry ARGS``."""
    return torchrun_command(
        args, nproc_per_node=launch.nproc_per_node, nnodes=launch.nnodes, rdzv_endpoint=launch.rdzv_endpoint
    )


def run_torchrun(
    command: Sequence[str], *, what: str, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Run a torchrun command to its end, its output (the workers' too) going where this process's goes.

    A non-zero exit raises :class:`LaunchFailed` naming ``what`` and the exit code. Ctrl-C or SIGTERM of this
    process sends torchrun one SIGTERM (it stops its workers, each in its own session, then exits) and
    raises ``KeyboardInterrupt`` once torchrun is gone; torchrun itself runs in its own process group, so
    a terminal's Ctrl-C reaches it once, through here, and dies with this process (Linux) if this one is
    killed."""
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=None if env is None else dict(env),
        process_group=0,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    restore = _interrupt_on_sigterm()
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise
    finally:
        restore()
    if returncode != 0:
        code = returncode if returncode > 0 else 128 - returncode
        how = f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with code {code}"
        raise LaunchFailed(
            f"{what}: torchrun {how}: a training process failed (its error is above; torchrun's summary names "
            "the rank). Run the same command again to resume from the last checkpoint.",
            code,
        )


_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up here: the child, between fork and exec, only calls it
_SIGTERM = int(signal.SIGTERM)


def _die_with_parent() -> None:
    """In torchrun's process, before exec: SIGTERM when the launching process dies (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGTERM)


def _interrupt_on_sigterm():
    """While torchrun runs, SIGTERM of this process is a KeyboardInterrupt (so it reaches torchrun); returns
    the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen, grace: float = 90.0) -> None:
    """SIGTERM to torchrun (which gives its workers 30 s after its own SIGTERM to them), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    signals = (signal.SIGINT, signal.SIGTERM) if _main_thread() else ()
    original = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}  # the stop is not interrupted
    try:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------- slurm


class _Shell(str):
    """A word of the script left to the shell to expand (``"$SLURM_NNODES"``), not quoted."""


def _words(command: Sequence[str]) -> str:
    return " ".join(word if isinstance(word, _Shell) else shlex.quote(word) for word in command)


def sbatch_script(
    args: Sequence[str],
    launch: LaunchConfig,
    *,
    job_name: str,
    output: str | os.PathLike,
    workdir: str | os.PathLike,
    python: str | None = None,
    title: str | None = None,
) -> str:
    """The batch script that runs ``medfoundry ARGS`` on ``launch.nnodes`` nodes: one Slurm task per node,
    each running torchrun with ``launch.nproc_per_node`` workers; several nodes meet at a c10d rendezvous
    on the job's first node, one node uses ``--standalone``. ``output`` is the job's log (``%j``: its id)."""
    slurm = launch.slurm or SlurmLaunchConfig()
    python = python or sys.executable
    directives = {
        "job-name": slurm.job_name or job_name,
        "nodes": str(launch.nnodes),
        "ntasks-per-node": "1",
        "gpus-per-node": None if slurm.gpus_per_node is None else str(slurm.gpus_per_node),
        "cpus-per-task": None if slurm.cpus_per_task is None else str(slurm.cpus_per_task),
        "partition": slurm.partition,
        "account": slurm.account,
        "time": slurm.time,
        "chdir": str(Path(workdir).resolve()),
        "output": str(output),
        **{name.replace("_", "-"): value for name, value in slurm.sbatch_args.items()},
    }
    lines = ["#!/bin/bash", f"# {title or 'medfoundry ' + ' '.join(args)}; written by medfoundry, submitted by it"]
    lines += [
        f"#SBATCH --{name}" + (f"={value}" if value != "" else "")
        for name, value in directives.items()
        if value is not None
    ]
    lines += ["", "set -eo pipefail"]
    if sys.prefix != sys.base_prefix:
        lines.append(f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}")
    if slurm.env_command:
        lines.append(slurm.env_command)
    if launch.nnodes > 1:
        # the first node hosts the rendezvous; sed (not head) reads the whole list: no SIGPIPE under pipefail
        lines.append('head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)')
        torchrun = torchrun_command(
            args,
            nproc_per_node=launch.nproc_per_node,
            nnodes=_Shell('"$SLURM_NNODES"'),
            rdzv_endpoint=_Shell(f'"$head_node:{slurm.rdzv_port}"'),
            rdzv_id=_Shell('"$SLURM_JOB_ID"'),
            python=python,
        )
    else:
        torchrun = torchrun_command(args, nproc_per_node=launch.nproc_per_node, python=python)
    lines.append("srun --kill-on-bad-exit=1 " + _words(torchrun))
    return "\n".join(lines) + "\n"


def submit(script: str | os.PathLike) -> str:
    """``sbatch --parsable SCRIPT``; the job id."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise ConfigError("sbatch: not found; launcher slurm needs Slurm's commands on PATH") from None
    except subprocess.TimeoutExpired:
        raise LaunchFailed(f"sbatch {script}: no answer in 300 s; nothing is known to be submitted", 1) from None
    if done.returncode != 0:
        raise LaunchFailed(
            f"sbatch {script}: exited with code {done.returncode}: {done.stderr.strip() or done.stdout.strip()}",
            done.returncode,
        )
    found = re.match(r"\s*(\d+)", done.stdout) or re.search(r"Submitted batch job (\d+)", done.stdout)
    if not found:
        raise LaunchFailed(f"sbatch {script}: no job id in its output {done.stdout.strip()!r}", 1)
    return found.group(1)


# the states of a job that has ended (squeue may still list one for a few minutes)
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
}


def job_state(job_id: str) -> tuple[bool, str | None]:
    """``(active, state)``: whether the job is still queued or running (``squeue`` lists it in a state other
    than an ended one), and its state as Slurm names it (``squeue``'s; once the job has left the queue,
    ``sacct``'s, None without accounting). When ``squeue`` fails for another reason than an unknown job (the
    controller does not answer), nothing can be told: :class:`~medfoundry.errors.Pending`, so that a job
    that may still be running is never submitted twice."""
    try:
        listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError(f"squeue: not found; cannot tell whether slurm job {job_id} is still running") from None
    except subprocess.TimeoutExpired:
        raise Pending(f"squeue -j {job_id}: no answer in 60 s; run the same command again later") from None
    if listed.returncode == 0 and listed.stdout.strip():
        state = listed.stdout.split()[0].rstrip("+")
        if state not in ENDED:
            return True, state
        return False, state
    if listed.returncode != 0 and "invalid job id" not in (listed.stderr + listed.stdout).lower():
        raise Pending(
            f"squeue -j {job_id} failed ({(listed.stderr or listed.stdout).strip()}): cannot tell whether the job "
            "is still running; run the same command again later"
        )
    return False, _accounted_state(job_id)


def _accounted_state(job_id: str) -> str | None:
    try:
        done = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = done.stdout.split()
    return states[0] if done.returncode == 0 and states else None
