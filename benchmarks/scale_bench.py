"""FSDP2 on 1, 2 and 4 processes (torchrun, gloo) on one machine: what sharding does to each process's
memory, sharded checkpoints' save and load, and resumes on another number of processes (issue 16).

The model is the ``llama-600m`` preset (0.6B parameters at the train benchmark's 28,896-token
vocabulary), trained in fp32 with micro-batches of one 64-token window and a global batch of 4, a
constant learning rate, through ``medfoundry pretrain`` itself. For each process count N:

- ``scratch``: from scratch (under FSDP2 built on the meta device, each process materializing its
  shards), K steps, a checkpoint at step K;
- ``resume``: the same run continued to 2K steps (reads the checkpoint, saves at 2K);
- ``init_from``: a run that starts from the Hugging Face export of the 1-process run (each process
  reads its rows of the safetensors files), one step and a save.

Then two resharded resumes: the 4-process checkpoint of step K continued on 2 processes, and the
2-process one on 1 process; their losses at steps K+1..2K are compared with the same-size runs'
(``resume``), which continue exactly (tested). Every run writes ``memory.json`` (each process's peak
resident memory by phase: init, resume, train, save, export; seconds by phase).

The last line is one JSON object: per process count, each rank's peaks by phase, save and load
seconds, checkpoint bytes per rank; and the summary keys ``rss_ratio_4_vs_1`` (target <= 0.40),
``save_resume_over_train`` (target <= 1.10) and ``resharded_resume_ok``. ``--quick``: K=2 (else 4).
Needs about 30 GB of free disk under the work folder (checkpoints of 7 GB at one process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent
COUNTS = (1, 2, 4)
PHASES = ("init", "train", "save", "resume")
RTOL = 1e-4  # fp32 losses of a resharded resume: the same windows, summed in another order


def _tree(data: dict, out: Path, steps: int, init_from: str | None = None) -> dict:
    model = {"preset": "llama-600m", "context": 64, "overrides": {}}
    if init_from:
        model["init_from"] = init_from
    return {
        "output_dir": str(out),
        "model": model,
        "data": {
            "tokens_dir": str(Path(data["dir"]) / "tokens"),
            "tokenizer_dir": str(Path(data["dir"]) / "tokenizer"),
        },
        "training": {"steps": steps, "micro_batch_size": 1, "global_batch_size": 4, "precision": "fp32", "seed": 0},
        "optim": {"lr": 3e-4},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "checkpoint": {"every": steps, "keep_last": 2},
        "eval": {"every": 1000, "batches": 1},
        "log": {"every": 1},
        "distributed": {"strategy": "fsdp"},
        "export": {"dtype": "fp32"},
    }


def _torchrun(tree: dict, nproc: int, work: Path, name: str) -> dict:
    """Run ``medfoundry pretrain`` on ``nproc`` processes; its memory.json, losses and wall seconds."""
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "medfoundry", "pretrain", str(config)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name}: medfoundry pretrain on {nproc} processes failed:\n{done.stderr[-4000:]}")
    out = Path(tree["output_dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    print(f"{name}: {nproc} processes, {seconds:.0f} s", flush=True)
    return {"memory": json.loads((out / "memory.json").read_text()), "losses": losses, "seconds": seconds}


def _checkpoint_bytes(step_dir: Path) -> list[int]:
    """Bytes each process wrote into a checkpoint (its shard file and RNG state; process 0 also the
    index, the trainer state and the model description), from the manifest."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    world = manifest["world_size"]
    sizes = [0] * world
    for name, entry in manifest["files"].items():
        if name.startswith("__"):
            rank = int(name[2:].split("_")[0])
        elif name.startswith("rng-"):
            rank = int(name[4:9])
        else:
            rank = 0
        sizes[rank] += entry["bytes"]
    return sizes


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def _per_rank(memory: dict, phase: str) -> list[int]:
    return [rank["peak_rss_bytes"].get(phase, 0) for rank in memory["ranks"]]


def _counts_report(runs: dict, work: Path, steps: int) -> dict:
    """Per process count: each rank's peak by phase, save/load seconds, checkpoint bytes per rank."""
    report = {}
    for n in COUNTS:
        scratch, resume, init_from = runs[f"scratch-{n}"], runs[f"resume-{n}"], runs[f"init_from-{n}"]
        ranks = []
        for r in range(n):
            peak = {
                "init": scratch["memory"]["ranks"][r]["peak_rss_bytes"]["init"],
                "init_from": init_from["memory"]["ranks"][r]["peak_rss_bytes"]["init"],
                "train": max(run["memory"]["ranks"][r]["peak_rss_bytes"]["train"] for run in (scratch, resume)),
                "save": max(run["memory"]["ranks"][r]["peak_rss_bytes"]["save"] for run in (scratch, resume)),
                "resume": resume["memory"]["ranks"][r]["peak_rss_bytes"]["resume"],
                "export": scratch["memory"]["ranks"][r]["peak_rss_bytes"].get("export", 0),
            }
            ranks.append({phase: _gib(value) for phase, value in peak.items()} | {"bytes": peak})
        saves = [rank["seconds"]["save"] / rank["count"]["save"] for rank in scratch["memory"]["ranks"]]
        loads = [rank["seconds"]["resume"] for rank in resume["memory"]["ranks"]]
        report[str(n)] = {
            "peak_rss_gib": [{k: v for k, v in rank.items() if k != "bytes"} for rank in ranks],
            "_bytes": [rank["bytes"] for rank in ranks],
            "save_seconds": round(max(saves), 2),
            "load_seconds": round(max(loads), 2),
            "checkpoint_bytes_per_rank": _checkpoint_bytes(work / f"scratch-{n}" / "checkpoints" / f"step-{steps:08d}"),
            "run_seconds": {
                name: round(runs[f"{name}-{n}"]["seconds"], 1) for name in ("scratch", "resume", "init_from")
            },
        }
    return report


def _summary(report: dict) -> dict:
    ratios = {}
    for phase in PHASES:
        one = (
            report["1"]["_bytes"][0][phase]
            if phase != "init"
            else max(report["1"]["_bytes"][0][p] for p in ("init", "init_from"))
        )
        four = max(
            rank[phase] if phase != "init" else max(rank["init"], rank["init_from"]) for rank in report["4"]["_bytes"]
        )
        ratios[phase] = round(four / one, 3)
    over = max(max(rank["save"], rank["resume"]) / rank["train"] for n in COUNTS for rank in report[str(n)]["_bytes"])
    return {
        "rss_ratio_4_vs_1_by_phase": ratios,
        "rss_ratio_4_vs_1": max(ratios.values()),
        "save_resume_over_train": round(over, 3),
    }


def _resharded(data: dict, work: Path, runs: dict, steps: int, source: int, target: int) -> dict:
    """The checkpoint of step K written by ``source`` processes, continued on ``target`` processes: its
    losses at steps K+1..2K against the ``source``-process run's."""
    out = work / f"reshard-{source}to{target}"
    (out / "checkpoints").mkdir(parents=True)
    step = f"step-{steps:08d}"
    shutil.copytree(
        work / f"scratch-{source}" / "checkpoints" / step, out / "checkpoints" / step, copy_function=os.link
    )
    run = _torchrun(_tree(data, out, 2 * steps), target, work, out.name)
    shutil.rmtree(out / "checkpoints")
    expected = {s: runs[f"resume-{source}"]["losses"][s] for s in range(steps + 1, 2 * steps + 1)}
    got = {s: run["losses"].get(s) for s in expected}
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) if got[s] is not None else float("inf") for s in expected)
    return {
        "from": source,
        "to": target,
        "losses": got,
        "expected": expected,
        "max_rel_diff": worst,
        "ok": worst <= RTOL and sorted(run["losses"]) == sorted(expected),  # it resumed: no step before K+1
    }


def _machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
    return {"cpu_model": model or platform.processor(), "amx": "amx_tile" in flags, "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K=2 steps per segment (else 4); same model and counts")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder, removed)")
    args = parser.parse_args()
    steps = 2 if args.quick else 4
    from train_bench import prepare_data

    data = prepare_data(fresh=False)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict = {}
    try:
        for n in COUNTS:
            out = work / f"scratch-{n}"
            runs[f"scratch-{n}"] = _torchrun(_tree(data, out, steps), n, work, f"scratch-{n}")
            # step K, kept for the resharded resumes (hard links: checkpoint files are never changed in place)
            shutil.copytree(out / "checkpoints", work / f"saved-{n}", copy_function=os.link)
            runs[f"resume-{n}"] = _torchrun(_tree(data, out, 2 * steps), n, work, f"resume-{n}")
            shutil.rmtree(out / "checkpoints")
            (work / f"saved-{n}").rename(out / "checkpoints")
            base = str(work / "scratch-1" / "model")
            runs[f"init_from-{n}"] = _torchrun(_tree(data, work / f"init_from-{n}", 1, base), n, work, f"init_from-{n}")
            shutil.rmtree(work / f"init_from-{n}")
        report = _counts_report(runs, work, steps)
        resharded = [_resharded(data, work, runs, steps, 4, 2), _resharded(data, work, runs, steps, 2, 1)]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = _summary(report)
    for n in COUNTS:
        report[str(n)].pop("_bytes")
    result = {
        "benchmark": "scale_bench",
        "machine": _machine(),
        "model": "llama-600m at the train benchmark's 28,896-token vocabulary (0.59B parameters), fp32, FSDP2 on gloo",
        "steps_per_segment": steps,
        "per_process_count": report,
        "resharded": resharded,
        **summary,
        "resharded_resume_ok": all(r["ok"] for r in resharded),
        "targets": {"rss_ratio_4_vs_1": 0.40, "save_resume_over_train": 1.10, "resharded_resume_ok": True},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
