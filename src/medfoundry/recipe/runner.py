"""``medfoundry run RECIPE``: every stage of a recipe in order, each skipped when already done.

Stages are run through the stage registry (:mod:`medfoundry.stages`), exactly as their own commands run
them. A stage's key (:func:`_key`) hashes what decides its output: its wired config as far as it changes
the output (:meth:`~medfoundry.stages.Stage.key_config`: without settings such as ``log.every`` or
``workers``, with run-time defaults such as eval's benchmarks folder resolved), the medfoundry version and
those of the libraries computing it, the :func:`~medfoundry.manifest.inputs_fingerprint` (by name, size
and modification time: no file is read) of every file outside the run directory that its config names
(corpus sources, a model to continue, benchmark files), and the stage before it: that stage's key and the
fingerprint of its output's ``manifest.json``. Keys are computed as the run goes, each once the stage
before has run, so a stage rebuilt by a run that then stopped (``--until``, a kill) gives every later
stage a new key.

``run_dir/stages.json`` records each stage's key and status. A stage recorded ``done`` under the key
computed now, whose ``manifest.json`` is there, is skipped: re-running a recipe does nothing, and changing
a stage (or rebuilding it) reruns it and every stage after it. A stage recorded ``running`` (or
``pending``) under the same key was interrupted: it runs again into the same directory, where the stage's
own resumption applies (training continues from its last checkpoint). Any other stage starts afresh, in
this order, so that a kill between any two steps leaves it ``starting`` or ``running``, never ``done``
without its output: it is recorded ``starting`` under the new key (stages.json is written atomically and
fsynced), its old output is moved to ``run_dir/.previous/<stage>`` (kept until the next change, never
deleted outright; a stage found ``starting`` has its old output moved aside again, never resumed), it is
recorded ``running``, it runs, it is recorded ``done``. Entries of a ``stages.json`` this version cannot
read are ignored: those stages run again.

Each stage's wired config is written to ``run_dir/configs/<stage>.yaml``, so any stage can be rerun
alone with its own command (``medfoundry pretrain runs/x/configs/pretrain.yaml``, or under torchrun).
The run ends with ``run_dir/report.md`` (:mod:`medfoundry.recipe.report`) and ``run_dir/run.json``.

With a ``distributed:`` section, the training stages run that same command on several processes
(:mod:`medfoundry.train.launch`): under torchrun, started and waited for here (its first process writes
the manifest); or in a Slurm job: the runner writes ``run_dir/slurm/<stage>.sbatch``, submits it, records
the job id in ``stages.json`` (status ``pending``) and ``run_dir/slurm/<stage>.json``, and stops with
:class:`~medfoundry.errors.Pending` (exit code 75). Run again, the recipe says the job is still queued or
running (still pending), continues once the job has written the stage's manifest, or, when the job ended
without it, submits the stage again (training resumes from its last checkpoint).
"""

from __future__ import annotations

import contextlib
import glob
import json
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import yaml

from medfoundry import __version__
from medfoundry.card.config import CardRunConfig
from medfoundry.config import StrictModel, apply_overrides, load_yaml, validate
from medfoundry.errors import ConfigError, InputError, Pending, StageFailed
from medfoundry.io import folder_lock, fsync_dir, write_json, write_text
from medfoundry.manifest import MANIFEST, Manifest, content_key, inputs_fingerprint, output_fingerprint
from medfoundry.recipe.config import RecipeConfig, wire
from medfoundry.stages import STAGES
from medfoundry.train.launch import LaunchConfig, job_state, launch_torchrun, run_torchrun, sbatch_script, submit


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    tree = apply_overrides(load_yaml(path), overrides or [])
    return validate(RecipeConfig, tree, str(path))


def run_recipe(
    recipe: RecipeConfig,
    *,
    start: str | None = None,
    until: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or, with ``dry_run``, plan) the recipe's stages; returns the run summary written to run.json.

    ``start`` reruns that stage and every later one even when done; ``until`` stops after that stage. A run
    holds the run folder's lock throughout (``stages.json`` has one writer): a second one fails at once.
    """
    with contextlib.nullcontext() if dry_run else folder_lock(recipe.run_dir, "medfoundry run"):
        return _run_recipe(recipe, start=start, until=until, dry_run=dry_run, log=log)


def _run_recipe(
    recipe: RecipeConfig, *, start: str | None, until: str | None, dry_run: bool, log: Callable[[str], None]
) -> dict:
    configs = wire(recipe)  # every stage validated before any work
    if recipe.card is not None:  # the card section itself is read from recipe.yaml by the card stage
        configs["card"] = CardRunConfig(run_dir=recipe.run_dir)
    present = recipe.present()
    for name, option in ((start, "--from"), (until, "--until")):
        if name is not None and name not in present:
            raise ConfigError(f"{option} {name}: not a stage of this recipe (its stages: {', '.join(present)})")
    run = Path(recipe.run_dir)
    state = _read_state(run)
    chosen = present[: present.index(until) + 1] if until else present
    summary = {"recipe": recipe.name, "medfoundry_version": __version__, "run_dir": str(run), "stages": {}}
    if not dry_run:
        run.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(run)
        write_text(
            run / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
        )
    upstream: dict | None = None  # the stage before: its key and its output's fingerprint
    rerun_from: str | None = None  # dry run: the first stage that would run (those after it read its output)
    forced = False  # from ``start`` on: a rerun stage's output can come out byte for byte the same (its manifest's
    # rounded timings included), which would leave the next stage's key, and so the stage, as they were
    try:
        for stage in chosen:
            forced = forced or stage == start
            key = _key(recipe, configs, stage, upstream)
            if dry_run:
                planned = _plan(recipe, run, stage, key, state.get(stage, {}), forced, rerun_from, log)
                summary["stages"][stage] = planned
                if planned["this_run"] == "would run":
                    rerun_from = rerun_from or stage
            else:
                summary["stages"][stage] = _advance(recipe, configs, stage, key, state, forced, log)
            upstream = {"key": key, "output": _output_fingerprint(run, stage)}
    except Pending:
        summary["stages"][stage] = {**state.get(stage, {}), "this_run": "pending"}
        _finish(recipe, run, summary)
        raise
    if not dry_run:
        _finish(recipe, run, summary)
    return summary


def _advance(
    recipe: RecipeConfig, configs: dict, stage: str, key: str, state: dict, forced: bool, log: Callable[[str], None]
) -> dict:
    """The stage skipped (done under ``key``), continued (interrupted under ``key``: same directory) or run
    afresh; its entry of the run summary."""
    run = Path(recipe.run_dir)
    done = state.get(stage, {})
    if done.get("status") == "pending":  # a Slurm job submitted by an earlier run
        ended = _pending_job(run, stage, done, key, forced, log)
        if ended is not None:  # it wrote the stage's manifest: done
            state[stage] = ended
            _write_state(run, state)
            return {**ended, "this_run": "ran"}
    if not forced and _done(run, stage, key, done):
        log(f"run: {stage}: done earlier (key {key[:12]}), skipped")
        return {**done, "this_run": "cached"}
    if forced or done.get("key") != key or done.get("status") not in ("running", "pending"):
        _start_afresh(run, stage, key, state)
    return {**_run_stage(recipe, configs, stage, key, state, log), "this_run": "ran"}


def _plan(
    recipe: RecipeConfig,
    run: Path,
    stage: str,
    key: str,
    done: dict,
    forced: bool,
    rerun_from: str | None,
    log: Callable[[str], None],
) -> dict:
    """What :func:`_advance` would do, logged, with nothing written; a stage after one that would run would run
    too (its key depends on that stage's new output)."""
    if not forced and rerun_from is None and _done(run, stage, key, done):
        log(f"run: {stage}: done earlier (key {key[:12]}), skipped")
        return {**done, "this_run": "cached"}
    why = f"after {rerun_from}" if rerun_from else f"key {key[:12]}"
    job = f"; slurm job {done['job_id']} was submitted for it" if done.get("status") == "pending" else ""
    log(f"run: {stage}: would run{_how(recipe, stage)} ({why}{job})")
    return {"this_run": "would run"} if rerun_from else {"key": key, "this_run": "would run"}


def _finish(recipe: RecipeConfig, run: Path, summary: dict) -> None:
    from medfoundry.recipe.report import write_report

    summary["report"] = str(write_report(recipe, run, _read_state(run)))
    write_json(run / "run.json", summary)


def _run_stage(recipe: RecipeConfig, configs: dict, stage: str, key: str, state: dict, log) -> dict:
    run = Path(recipe.run_dir)
    if stage != "card":  # the card's is its section of recipe.yaml
        write_text(
            run / "configs" / f"{stage}.yaml", yaml.safe_dump(configs[stage].model_dump(mode="json"), sort_keys=False)
        )
    launch = recipe.distributed if STAGES[stage].multi_process else None
    if launch is not None and launch.launcher == "slurm":
        return _submit(recipe, stage, key, state, launch, log)
    log(f"run: {stage}: running (key {key[:12]})")
    started = time.time()
    state[stage] = {"key": key, "status": "running", "started": started}
    _write_state(run, state)
    if launch is None or launch.in_process:
        STAGES[stage].run(configs[stage])
    else:
        _torchrun(run, stage, launch, log)
    state[stage] = {"key": key, "status": "done", "started": started, "seconds": round(time.time() - started, 1)}
    _write_state(run, state)
    log(f"run: {stage}: done in {state[stage]['seconds']:,.0f} s")
    return state[stage]


# ---------------------------------------------------------------------------------------------- launchers


def _how(recipe: RecipeConfig, stage: str) -> str:
    launch = recipe.distributed if STAGES[stage].multi_process else None
    if launch is None or launch.in_process:
        return ""
    return f" on {launch.describe()}" + (" as a slurm job" if launch.launcher == "slurm" else " under torchrun")


def _stage_words(run: Path, stage: str) -> list[str]:
    """``medfoundry`` arguments that run the stage from the config the runner wrote."""
    return [*STAGES[stage].command, str(run / "configs" / f"{stage}.yaml")]


def _torchrun(run: Path, stage: str, launch: LaunchConfig, log) -> None:
    """The stage under torchrun on this node; its first process writes the manifest."""
    words = _stage_words(run, stage)
    command = launch_torchrun(words, launch)
    log(f"run: {stage}: on {launch.describe()}: {shlex.join(command)}")
    if launch.nnodes > 1:
        log(
            f"run: {stage}: start the same on each of the other {launch.nnodes - 1} node(s), from this directory: "
            f"medfoundry {shlex.join(words)} --nproc-per-node {launch.nproc_per_node} --nnodes {launch.nnodes} "
            f"--rdzv-endpoint {launch.rdzv_endpoint}"
        )
    run_torchrun(command, what=f"run: {stage}")
    if not _finished(run, stage):
        raise StageFailed(
            f"run: {stage}: torchrun ended without error but {run / stage / 'manifest.json'} is not there"
        )


def _submit(recipe: RecipeConfig, stage: str, key: str, state: dict, launch: LaunchConfig, log) -> NoReturn:
    """Write the stage's batch script (``run_dir/slurm/<stage>.sbatch``), submit it, record the job in
    ``stages.json`` (status ``pending``) and stop the run: :class:`Pending`."""
    run = Path(recipe.run_dir)
    slurm_dir = run / "slurm"
    script = slurm_dir / f"{stage}.sbatch"
    log_pattern = slurm_dir / f"{stage}-%j.out"
    write_text(
        script,
        sbatch_script(
            [*STAGES[stage].command, str((run / "configs" / f"{stage}.yaml").resolve())],
            launch,
            job_name=f"medfoundry-{recipe.name}-{stage}",
            output=log_pattern.resolve(),
            workdir=Path.cwd(),
            title=f"medfoundry run: recipe {recipe.name}, stage {stage}, on {launch.describe()}",
        ),
    )
    job = submit(script)
    log_path = slurm_dir / f"{stage}-{job}.out"
    state[stage] = {"key": key, "status": "pending", "job_id": job, "submitted": time.time(), "log": str(log_path)}
    _write_state(run, state)
    write_json(slurm_dir / f"{stage}.json", {"job_id": job, "script": str(script), "log": str(log_path)})
    log(f"run: {stage}: submitted as slurm job {job} ({launch.describe()}; script {script}, log {log_path})")
    raise Pending(
        f"run: {stage}: slurm job {job} submitted ({launch.describe()}; log {log_path}). Run the same command "
        "again once it has ended: the recipe continues from there"
    )


def _pending_job(run: Path, stage: str, done: dict, key: str, forced: bool, log) -> dict | None:
    """The Slurm job an earlier run submitted for the stage: still queued or running, :class:`Pending`; ended
    with the manifest written, the stage's done entry; ended without it (failed, cancelled, out of time), None:
    the stage is submitted again and training resumes from its last checkpoint."""
    job = str(done["job_id"])
    active, slurm_state = job_state(job)
    if active:
        if done.get("key") != key or forced:
            raise ConfigError(
                f"run: {stage}: slurm job {job}, submitted for the stage's previous config, is still "
                f"{slurm_state.lower()}: wait for it to end, or cancel it (scancel {job}), before changing or "
                "rerunning the stage"
            )
        raise Pending(
            f"run: {stage}: slurm job {job} is still {slurm_state.lower()} (log {done.get('log')}). Run the same "
            "command again once it has ended"
        )
    if done.get("key") == key and not forced and _finished(run, stage):
        seconds = Manifest.read(run / stage, stage).timings.get("total_s")
        log(f"run: {stage}: done by slurm job {job}" + (f" in {seconds:,.0f} s" if seconds is not None else ""))
        return {
            "key": key,
            "status": "done",
            "started": done.get("submitted"),
            "job_id": job,
            **({"seconds": round(seconds, 1)} if seconds is not None else {}),
        }
    if done.get("key") == key and not forced:
        how = f"ended ({slurm_state})" if slurm_state else "ended"
        log(
            f"run: {stage}: slurm job {job} {how} without writing {run / stage / 'manifest.json'}; submitting it "
            f"again (training resumes from its last checkpoint). The job's log: {done.get('log')}"
            + _tail(done.get("log"))
        )
    return None


def _tail(path: str | None, lines: int = 15) -> str:
    if not path or not Path(path).is_file():
        return ""
    text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return "".join(f"\n  | {line}" for line in text)


# ---------------------------------------------------------------------------------------------- keys


def _key(recipe: RecipeConfig, configs: dict[str, StrictModel], stage: str, upstream: dict | None) -> str:
    """The hash of what decides the stage's output (see the module's docstring). ``upstream`` is the stage
    before it, as it is now: its key and its output's fingerprint; so a stage is done only while it was
    built from the current output of the stages before it."""
    entry = STAGES[stage]
    payload = entry.key_config(recipe.card if stage == "card" else configs[stage])
    run = Path(recipe.run_dir).resolve()
    return content_key(stage, payload, upstream, __version__, entry.versions(), _external_inputs(payload, run))


def _output_fingerprint(run: Path, stage: str) -> str | None:
    """The fingerprint of the stage's ``manifest.json`` (changed by every rebuild), None without one."""
    return output_fingerprint(run / stage) if (run / stage / MANIFEST).is_file() else None


def _external_inputs(payload, run: Path) -> dict[str, str]:
    """The fingerprint, by name, size and modification time, of every existing file or folder a config string
    names (directly or as a glob) outside the run directory: changed inputs change the key."""
    found = {}
    for value in _strings(payload):
        if len(value) > 4096 or "\n" in value:
            continue
        paths = [Path(p) for p in sorted(glob.glob(value))] if any(c in value for c in "*?[") else [Path(value)]
        for path in paths:
            try:
                resolved = path.resolve()
                if resolved == run or run in resolved.parents or not path.exists():
                    continue
            except OSError:
                continue
            found[str(path)] = inputs_fingerprint(path, by="stat")
    return found


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# ---------------------------------------------------------------------------------------------- state


def _read_state(run: Path) -> dict[str, dict]:
    """``stages.json``: stage -> its entry (key, status, times). Entries this version did not write (no key)
    are left out: those stages run again."""
    path = run / "stages.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}); remove it to rerun every stage") from None
    if not isinstance(state, dict):
        return {}
    return {stage: entry for stage, entry in state.items() if isinstance(entry, dict) and "key" in entry}


def _write_state(run: Path, state: dict) -> None:
    write_json(run / "stages.json", state)


def _remove_temporaries(run: Path) -> None:
    """Remove the hidden temporary files (``.stages.json.XXXX.tmp``...) of the runner's atomic writes that a
    killed run left: in the run folder, ``configs/`` and ``slurm/``. The run folder's lock is held: no live
    process is writing them."""
    for folder in (run, run / "configs", run / "slurm"):
        for tmp in folder.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def _done(run: Path, stage: str, key: str, entry: dict) -> bool:
    """Whether the stage is recorded done under ``key`` and its output is whole."""
    return entry.get("key") == key and entry.get("status") == "done" and _finished(run, stage)


def _finished(run: Path, stage: str) -> bool:
    """Whether the stage's output carries its manifest (written last: the output is whole)."""
    try:
        Manifest.read(run / stage, stage)
    except InputError:
        return False
    return True


def _start_afresh(run: Path, stage: str, key: str, state: dict) -> None:
    """Record the stage as starting under ``key``, durably, then move its old output aside: killed in between,
    the next run finds it starting (not done, not resumable) and moves the old output aside then."""
    state[stage] = {"key": key, "status": "starting"}
    _write_state(run, state)
    _supersede(run, stage)


def _supersede(run: Path, stage: str) -> None:
    """Move the stage's old output aside (``.previous/<stage>``, replacing an older one) before it is rebuilt."""
    out = run / stage
    if not out.exists():
        return
    keep = run / ".previous" / stage
    if keep.exists():
        shutil.rmtree(keep)
    keep.parent.mkdir(parents=True, exist_ok=True)
    out.rename(keep)
    fsync_dir(keep.parent)
    fsync_dir(run)
