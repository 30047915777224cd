"""Launching the training stages on several processes (`medfoundry.train.launch`): the torchrun and sbatch
commands, the `distributed:` section's errors, `medfoundry pretrain --nproc-per-node 2` training on 2
processes, a failing worker failing the command with torchrun's exit code, and SIGTERM of the command
stopping every process it started. The Slurm stand-ins used here and by tests/test_recipe_run.py are
defined below (:func:`fake_slurm`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, descendants
from medfoundry.config import load_yaml, validate
from medfoundry.errors import ConfigError, Pending
from medfoundry.recipe.config import RecipeConfig
from medfoundry.train.launch import (
    LaunchConfig,
    job_state,
    sbatch_script,
    submit,
    torchrun_command,
    under_torchrun,
)
from test_pretrain import ENV, _records, _tree, tokens  # noqa: F401  (tokens: the shared data fixture)

PYTHON = sys.executable


def medfoundry(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "medfoundry", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------------------------- commands


def test_one_node_is_standalone_and_several_meet_at_the_endpoint():
    assert torchrun_command(["pretrain", "c.yaml"], nproc_per_node=2) == [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: two recipes on one machine do not collide
        "--nproc-per-node",
        "2",
        "-m",
        "medfoundry",
        "pretrain",
        "c.yaml",
    ]
    assert torchrun_command(["finetune", "c.yaml"], nproc_per_node=8, nnodes=4, rdzv_endpoint="node1:29500") == [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "4",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node1:29500",
        "--nproc-per-node",
        "8",
        "-m",
        "medfoundry",
        "finetune",
        "c.yaml",
    ]
    assert not under_torchrun({"PATH": "/bin"}) and under_torchrun({"WORLD_SIZE": "2", "LOCAL_RANK": "1"})


def test_the_seed_recipes_sbatch_script():
    """biomed-llama-7b's section (8 nodes x 4 A100, as the seed): one task per node, each running torchrun with
    4 workers, meeting at the job's first node; every setting of the section becomes its #SBATCH line."""
    recipe = validate(RecipeConfig, load_yaml(REPO / "recipes" / "biomed-llama-7b.yaml"))
    launch = recipe.distributed
    assert (launch.launcher, launch.nnodes, launch.nproc_per_node, launch.processes) == ("slurm", 8, 4, 32)
    script = sbatch_script(
        ["pretrain", "/runs/b/configs/pretrain.yaml"],
        launch,
        job_name="medfoundry-b-pretrain",
        output="/runs/b/slurm/pretrain-%j.out",
        workdir="/tmp",
        python="/venv/bin/python",
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in (
        "--job-name=medfoundry-b-pretrain",
        "--nodes=8",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--exclusive",
        f"--time={launch.slurm.time}",
        "--chdir=/tmp",
        "--output=/runs/b/slurm/pretrain-%j.out",
    ):
        assert f"#SBATCH {directive}" in lines, directive
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in lines
    assert lines[-1] == (
        'srun --kill-on-bad-exit=1 /venv/bin/python -m torch.distributed.run --nnodes "$SLURM_NNODES" '
        '--rdzv-backend c10d --rdzv-endpoint "$head_node:29500" --rdzv-id "$SLURM_JOB_ID" --nproc-per-node 4 '
        "-m medfoundry pretrain /runs/b/configs/pretrain.yaml"
    )
    extra = LaunchConfig(
        launcher="slurm",
        nproc_per_node=2,
        slurm={"partition": "cpu", "account": "medlab", "sbatch_args": {"qos": "high", "exclusive": ""}},
    )
    one = sbatch_script(["pretrain", "c.yaml"], extra, job_name="j", output="o", workdir="/tmp").splitlines()
    assert {"#SBATCH --partition=cpu", "#SBATCH --account=medlab", "#SBATCH --qos=high", "#SBATCH --exclusive"} <= set(
        one
    )
    assert not any("gpus-per-node" in line for line in one)
    assert "--standalone --nproc-per-node 2 -m medfoundry pretrain c.yaml" in one[-1]  # one node: no head node


@pytest.mark.parametrize(
    "section, message",
    [
        ({"nnodes": 2}, "distributed.rdzv_endpoint: Value error, required when nnodes is 2 with launcher torchrun"),
        ({"nnodes": 2, "rdzv_endpoint": "node1"}, "distributed.rdzv_endpoint: Value error, expected HOST:PORT"),
        ({"nproc_per_node": 0}, "distributed.nproc_per_node: Input should be greater than or equal to 1"),
        ({"launcher": "mpirun"}, "distributed.launcher: Input should be 'torchrun' or 'slurm'"),
        ({"launcher": "slurm", "rdzv_endpoint": "node1:29500"}, "distributed.rdzv_endpoint: .*not used with launcher"),
        ({"slurm": {"partition": "gpu"}}, "distributed.slurm: Value error, only used with launcher: slurm"),
        (
            {"launcher": "slurm", "nproc_per_node": 8, "slurm": {"gpus_per_node": 4}},
            r"distributed.slurm: .*gpus_per_node \(4\) is less than nproc_per_node \(8\)",
        ),
        ({"launcher": "slurm", "slurm": {"time": "2 days"}}, r"distributed.slurm.time: .*\[D-\]HH:MM:SS"),
        ({"launcher": "slurm", "slurm": {"sbatch_args": {"--qos": "high"}}}, "distributed.slurm.sbatch_args"),
        (
            {"launcher": "slurm", "slurm": {"gpus": 8}},
            "distributed.slurm.gpus: unknown field; valid fields: .*gpus_per_node",
        ),
        ({"nprocs_per_node": 2}, "distributed.nprocs_per_node: unknown field; did you mean 'nproc_per_node'"),
    ],
)
def test_distributed_section_errors_name_the_field(section, message):
    tree = {"name": "x", "run_dir": "runs/x", "stages": {"pretrain": {}}, "distributed": section}
    with pytest.raises(ConfigError, match=message):
        validate(RecipeConfig, tree, "recipe.yaml")


def test_distributed_needs_a_training_stage():
    tree = {"name": "x", "run_dir": "runs/x", "stages": {"eval": {"models": ["m"]}}, "distributed": {}}
    with pytest.raises(ConfigError, match="distributed: .*no training stage"):
        validate(RecipeConfig, tree, "recipe.yaml")


# ---------------------------------------------------------------------------------------------- the CLI


def _config(tokens: dict, out: Path, path: Path, **training) -> Path:
    tree = _tree(tokens, out, **{"steps": 4, **training})
    tree["distributed"] = {"strategy": "fsdp"}
    tree["schedule"]["warmup_steps"] = 1
    tree["checkpoint"], tree["eval"] = {"every": 2}, {"every": 2, "batches": 2}
    path.write_text(yaml.safe_dump(tree))
    return path


def test_pretrain_cli_starts_itself_on_two_processes(tokens, tmp_path):
    out = tmp_path / "run"
    done = medfoundry("pretrain", str(_config(tokens, out, tmp_path / "c.yaml")), "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretrain: 2 processes: " in done.stderr and "torch.distributed.run --standalone" in done.stderr
    assert done.stdout.count("pretrain: 4 steps") == 1  # the summary, by the first process only
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert json.loads((out / "manifest.json").read_text())["counts"]["steps"] == 4
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4]


def test_launch_errors(tokens, tmp_path):
    """Wrong flags stop before anything starts; a worker that fails fails the command with torchrun's code."""
    cfg = _config(tokens, tmp_path / "run", tmp_path / "c.yaml")
    flags = medfoundry("pretrain", str(cfg), "--nproc-per-node", "2", "--nnodes", "2")
    assert flags.returncode == 2 and "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in flags.stderr
    assert "torch.distributed.run" not in flags.stderr
    typo = medfoundry("pretrain", str(cfg), "--nproc-per-node", "2", "--set", "training.step=3")
    assert typo.returncode == 2 and "training.step: unknown field" in typo.stderr
    assert "torch.distributed.run" not in typo.stderr  # the config is read before any launch

    failing = medfoundry("pretrain", str(cfg), "--nproc-per-node", "2", "--set", "schedule.warmup_steps=10")
    assert failing.returncode == 1, failing.stderr[-3000:]
    assert "warmup_steps (10) must be smaller" in failing.stderr  # the worker's own error
    assert "error: pretrain on 2 processes: torchrun exited with code 1: a training process failed" in failing.stderr


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_torchrun_and_its_workers(tokens, tmp_path, sig):
    """SIGTERM or SIGINT (Ctrl-C: torchrun runs in its own process group, so only the command gets it) of the
    command: torchrun is told once, stops its workers and exits; the command says it was interrupted."""
    out = tmp_path / "run"
    cfg = _config(tokens, out, tmp_path / "c.yaml", steps=100000)
    proc = subprocess.Popen(
        [PYTHON, "-m", "medfoundry", "pretrain", str(cfg), "--nproc-per-node", "2"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and any("loss" in r for r in _records(out)):
            break
        time.sleep(0.2)
    started = [proc.pid, *descendants(proc.pid)]
    assert proc.poll() is None and len(started) >= 4, "training did not start"  # medfoundry, torchrun, 2 workers
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if _alive(pid)]


# ---------------------------------------------------------------------------------------------- Slurm stand-ins

_SBATCH = '''
"""sbatch --parsable SCRIPT: records the script as job-ID.sh; with FAKE_SLURM_RUN=1 runs it now, to its end,
as a job of #SBATCH --nodes nodes (all on this machine), its output in the #SBATCH --output file."""
import os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_DIR"])
state.mkdir(parents=True, exist_ok=True)
job = 1000 + len(list(state.glob("job-*.sh")))
script = Path(sys.argv[-1]).read_text()
(state / f"job-{job}.sh").write_text(script)
(state / f"job-{job}.args").write_text(" ".join(sys.argv[1:-1]))
directive = lambda name, default: (re.findall(rf"^#SBATCH --{name}=(.*)$", script, re.M) or [default])[-1]
if os.environ.get("FAKE_SLURM_RUN") == "1":
    nodes = directive("nodes", "1")
    env = dict(os.environ, SLURM_JOB_ID=str(job), SLURM_NNODES=nodes, SLURM_JOB_NUM_NODES=nodes,
               SLURM_JOB_NODELIST=",".join(["localhost"] * int(nodes)))
    with open(directive("output", f"slurm-{job}.out").replace("%j", str(job)), "w") as log:
        rc = subprocess.run(["bash", "-c", script], env=env, cwd=directive("chdir", "."), stdout=log,
                            stderr=subprocess.STDOUT).returncode
    (state / f"job-{job}.rc").write_text(str(rc))
print(job if "--parsable" in sys.argv else f"Submitted batch job {job}")
'''

_SRUN = '''
"""srun [options] COMMAND: COMMAND once per node of the job (SLURM_NNODES), all here and at once; the
first failure stops the others (--kill-on-bad-exit) and is srun's exit code."""
import os, subprocess, sys, time

args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n)))
         for n in range(int(os.environ.get("SLURM_NNODES", "1")))]
while any(t.poll() is None for t in tasks):
    if any(t.poll() for t in tasks):
        for t in tasks:
            t.poll() is None and t.terminate()
    time.sleep(0.1)
sys.exit(next((t.returncode for t in tasks if t.returncode), 0))
'''

_SQUEUE = '''
"""squeue -h -j ID -o %T: the job's state while FAKE_SLURM_ACTIVE=1 (FAKE_SLURM_STATE, default PENDING);
FAKE_SQUEUE_ERROR: that error, exit code 1."""
import os, sys

if os.environ.get("FAKE_SQUEUE_ERROR"):
    sys.exit(print(os.environ["FAKE_SQUEUE_ERROR"], file=sys.stderr) or 1)
if os.environ.get("FAKE_SLURM_ACTIVE") == "1":
    print(os.environ.get("FAKE_SLURM_STATE", "PENDING"))
'''

_SACCT = '''
"""sacct -n -X -P -j ID -o State: COMPLETED or FAILED for a job that ran, CANCELLED for one that never did."""
import os, sys
from pathlib import Path

rc = Path(os.environ["FAKE_SLURM_DIR"]) / f"job-{sys.argv[sys.argv.index('-j') + 1]}.rc"
print(("COMPLETED" if rc.read_text() == "0" else "FAILED") if rc.is_file() else "CANCELLED")
'''

_SCONTROL = '''
"""scontrol show hostnames LIST: one host per line."""
import sys

print("\\n".join(sys.argv[3].split(",")))
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch, srun, squeue, sacct and scontrol stand-ins first on PATH; the job records in the returned folder."""
    bin_dir, state = tmp_path / "slurm_bin", tmp_path / "slurm_state"
    bin_dir.mkdir()
    for name, body in (
        ("sbatch", _SBATCH),
        ("srun", _SRUN),
        ("squeue", _SQUEUE),
        ("sacct", _SACCT),
        ("scontrol", _SCONTROL),
    ):
        (bin_dir / name).write_text(f"#!{PYTHON}\n" + textwrap.dedent(body).lstrip())
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    for name in ("MEDFOUNDRY_NO_TCMALLOC", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, ENV[name])
    for name in ("FAKE_SLURM_RUN", "FAKE_SLURM_ACTIVE", "FAKE_SLURM_STATE", "FAKE_SQUEUE_ERROR"):
        monkeypatch.delenv(name, raising=False)
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_and_job_state(fake_slurm, monkeypatch, tmp_path):
    """The job id from `sbatch --parsable`; a job is active while squeue lists it in a live state, ended when
    squeue does not know it (sacct then says how) or lists it as ended; when squeue itself fails, nothing is
    known and the answer is pending, never "ended" (which would submit a running job again)."""
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    assert submit(script) == "1000" and (fake_slurm / "job-1000.args").read_text() == "--parsable"
    assert job_state("1000") == (False, "CANCELLED")  # never ran (FAKE_SLURM_RUN unset), gone from the queue
    monkeypatch.setenv("FAKE_SLURM_ACTIVE", "1")
    assert job_state("1000") == (True, "PENDING")
    monkeypatch.setenv("FAKE_SLURM_STATE", "RUNNING")
    assert job_state("1000") == (True, "RUNNING")
    monkeypatch.setenv("FAKE_SLURM_STATE", "TIMEOUT")
    assert job_state("1000") == (False, "TIMEOUT")
    monkeypatch.setenv("FAKE_SQUEUE_ERROR", "slurm_load_jobs error: Invalid job id specified")
    assert job_state("1000") == (False, "CANCELLED")
    monkeypatch.setenv("FAKE_SQUEUE_ERROR", "slurm_load_jobs error: Unable to contact slurm controller")
    with pytest.raises(Pending, match="cannot tell whether the job is still running"):
        job_state("1000")
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here
    with pytest.raises(ConfigError, match="sbatch: not found; launcher slurm needs Slurm's commands on PATH"):
        submit(script)
