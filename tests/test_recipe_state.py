"""`medfoundry run`'s stage state, with stand-in stages (each writes its config and a manifest, instantly):
a stage is only trusted as done while its recorded key equals the key computed from the current upstream
output, so an earlier stage rebuilt by a run that stopped (`--until`, a kill between stages) reruns the
later ones next time; a kill at any point between recording a stage as started, moving its old output
aside, running it and recording it as done never leaves it "done" without its output; stage keys cover
the dependency versions and the defaults resolved at run time, and leave out the settings that change no
output (logging, checkpoint retention, workers)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from medfoundry.manifest import Manifest
from medfoundry.recipe import report, runner
from medfoundry.recipe.runner import load_recipe, run_recipe


class Killed(BaseException):
    """What a SIGKILL would do at that point: the run stops there, nothing after it happens."""


@dataclass
class Stub:
    """The stand-in stages' calls; ``kill_at`` names the point (``<what>:<stage>``) where the next run dies."""

    ran: list[str] = field(default_factory=list)
    fresh: dict[str, bool] = field(default_factory=dict)  # stage -> whether its last run started in an empty folder
    kill_at: str | None = None

    def point(self, name: str) -> None:
        if self.kill_at == name:
            self.kill_at = None
            raise Killed(name)


@pytest.fixture
def stub(monkeypatch) -> Stub:
    calls = Stub()

    def stand_in(name: str):
        def run(cfg) -> Manifest:
            out = Path(cfg.output_dir)
            calls.ran.append(name)
            calls.fresh[name] = not out.exists() or not any(out.iterdir())
            calls.point(f"midway:{name}")
            out.mkdir(parents=True, exist_ok=True)
            config = cfg.model_dump(mode="json")
            (out / "output.json").write_text(json.dumps(config))
            manifest = Manifest(stage=name, config=config, details={"call": len(calls.ran)})
            manifest.write(out)
            calls.point(f"output:{name}")
            return manifest

        return run

    stages = {name: replace(stage, run=stand_in(name)) for name, stage in runner.STAGES.items()}
    monkeypatch.setattr(runner, "STAGES", stages)
    supersede, write_state = runner._supersede, runner._write_state

    def supersede_with_kills(run: Path, stage: str) -> None:
        calls.point(f"before_supersede:{stage}")
        supersede(run, stage)
        calls.point(f"after_supersede:{stage}")

    def write_state_with_kills(run: Path, state: dict) -> None:
        write_state(run, state)
        for stage, entry in state.items():
            if entry.get("status") == "running":
                calls.point(f"running:{stage}")

    monkeypatch.setattr(runner, "_supersede", supersede_with_kills)
    monkeypatch.setattr(runner, "_write_state", write_state_with_kills)
    monkeypatch.setattr(report, "write_report", lambda recipe, run, state: run / "report.md")  # reads real manifests
    return calls


def recipe_tree(tmp_path: Path) -> dict:
    source = tmp_path / "abstracts.jsonl"
    if not source.exists():
        source.write_text('{"text": "x"}\n')
    return {
        "name": "stub",
        "run_dir": str(tmp_path / "run"),
        "stages": {
            "corpus": {
                "workers": 1,
                "sources": [{"name": "a", "kind": "jsonl", "paths": [str(source)]}],
                "decontam": {"enabled": False},
            },
            "tokenizer": {"vocab_size": 1000},
            "tokens": {"workers": 1},
            "pretrain": {
                "model": {"preset": "gpt2-tiny"},
                "training": {"steps": 4},
                "optim": {"lr": 1e-3},
                "checkpoint": {"every": 2, "keep_last": 2},
                "log": {"every": 1},
            },
        },
    }


def _run(tree: dict, stub: Stub, **options) -> list[str]:
    """Run the recipe; the stages that ran."""
    stub.ran.clear()
    path = Path(tree["run_dir"]).parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    run_recipe(load_recipe(path), log=lambda message: None, **options)
    return list(stub.ran)


def _changed(tree: dict, stage: str, dotted: str, value) -> dict:
    changed = json.loads(json.dumps(tree))
    node = changed["stages"][stage]
    *parents, last = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return changed


def _state(tree: dict) -> dict:
    return json.loads((Path(tree["run_dir"]) / "stages.json").read_text())


def _output(tree: dict, stage: str, previous: bool = False) -> dict | None:
    path = Path(tree["run_dir"]) / (".previous" if previous else "") / stage / "output.json"
    return json.loads(path.read_text()) if path.is_file() else None


ALL = ["corpus", "tokenizer", "tokens", "pretrain"]


# ---------------------------------------------------------------------------------------------- stale later stages


def test_a_stage_rerun_alone_reruns_the_later_stages_next_time(tmp_path, stub):
    tree = recipe_tree(tmp_path)
    assert _run(tree, stub) == ALL
    assert _run(tree, stub, start="tokenizer", until="tokenizer") == ["tokenizer"]
    planned = run_recipe(load_recipe(tmp_path / "recipe.yaml"), dry_run=True, log=lambda message: None)
    assert [s for s, v in planned["stages"].items() if v["this_run"] == "would run"] == ["tokens", "pretrain"]
    assert _run(tree, stub) == ["tokens", "pretrain"]  # they read the tokenizer's old output
    assert _run(tree, stub) == []


@pytest.mark.parametrize("change", ["config", "input"])
def test_a_changed_stage_run_with_until_reruns_the_later_stages_next_time(tmp_path, stub, change):
    tree = recipe_tree(tmp_path)
    assert _run(tree, stub) == ALL
    if change == "config":
        tree = _changed(tree, "corpus", "split", {"val_fraction": 0.2})
    else:
        source = tmp_path / "abstracts.jsonl"
        os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert _run(tree, stub, until="corpus") == ["corpus"]
    assert _run(tree, stub) == ["tokenizer", "tokens", "pretrain"]
    assert _run(tree, stub) == []


def test_a_kill_between_stages_after_a_resumed_stage_reruns_the_later_ones(tmp_path, stub):
    """The tokenizer, rerun, is killed midway; the next run resumes it in place and is killed before the
    tokens stage starts; the run after that reruns the tokens and pretraining, which read the old tokenizer."""
    tree = recipe_tree(tmp_path)
    assert _run(tree, stub) == ALL
    stub.kill_at = "midway:tokenizer"
    with pytest.raises(Killed):
        _run(tree, stub, start="tokenizer")
    stub.kill_at = "before_supersede:tokens"  # the first thing the tokens stage would do, whatever its state
    with pytest.raises(Killed):
        _run(tree, stub)
    assert _run(tree, stub) == ["tokens", "pretrain"]


# ---------------------------------------------------------------------------------------------- the kill window


def _check_no_done_stage_lost_its_output(tree: dict) -> None:
    run = Path(tree["run_dir"])
    for stage, entry in _state(tree).items():
        if entry["status"] == "done":
            assert (run / stage / "manifest.json").is_file(), f"{stage} recorded done, its output is gone"


@pytest.mark.parametrize(
    "point",
    ["before_supersede", "after_supersede", "running", "midway", "output"],
)
def test_a_kill_anywhere_in_a_stage_rerun_never_leaves_it_done_without_its_output(tmp_path, stub, point):
    """Pretraining's learning rate changes, and the run is killed at ``point``: before or after its old output
    is moved aside, once it is recorded running, midway, or once its new output is written. The state never
    says done without the output, and the next run ends with the new output, the old one kept aside."""
    tree = recipe_tree(tmp_path)
    assert _run(tree, stub) == ALL
    changed = _changed(tree, "pretrain", "optim.lr", 2e-3)
    stub.kill_at = f"{point}:pretrain"
    with pytest.raises(Killed):
        _run(changed, stub)
    _check_no_done_stage_lost_its_output(changed)
    assert _run(changed, stub) == ["pretrain"]
    assert stub.fresh["pretrain"] == (point != "output")  # a killed stage resumes in its folder
    assert _output(changed, "pretrain")["optim"]["lr"] == 2e-3
    assert _output(changed, "pretrain", previous=True)["optim"]["lr"] == 1e-3
    assert {entry["status"] for entry in _state(changed).values()} == {"done"}
    assert _run(changed, stub) == []


def test_a_stage_recorded_starting_does_not_resume_in_the_old_output(tmp_path, stub):
    """Killed after the new key was recorded but before the old output was moved: the next run moves it aside
    and starts from an empty folder, never resumes the old config's output under the new key."""
    tree = recipe_tree(tmp_path)
    _run(tree, stub)
    changed = _changed(tree, "pretrain", "training.steps", 6)
    stub.kill_at = "before_supersede:pretrain"
    with pytest.raises(Killed):
        _run(changed, stub)
    assert (Path(tree["run_dir"]) / "pretrain" / "manifest.json").is_file()  # the old output, not moved yet
    assert _run(changed, stub) == ["pretrain"] and stub.fresh["pretrain"]


# ---------------------------------------------------------------------------------------------- what keys cover


@pytest.mark.parametrize(
    "stage, dotted, value",
    [
        ("pretrain", "log.every", 5),
        ("pretrain", "log.tensorboard", True),
        ("pretrain", "checkpoint.keep_last", 5),
        ("pretrain", "checkpoint.async_save", True),
        ("pretrain", "data.verify_shards", False),
        ("tokens", "workers", 2),
        ("corpus", "workers", 2),
        ("corpus", "executor", {"kind": "slurm", "slurm": {"partition": "cpu"}}),
    ],
)
def test_settings_that_change_no_output_rerun_nothing(tmp_path, stub, stage, dotted, value):
    tree = recipe_tree(tmp_path)
    _run(tree, stub)
    assert _run(_changed(tree, stage, dotted, value), stub) == []


def test_the_learning_rate_reruns_training(tmp_path, stub):
    tree = recipe_tree(tmp_path)
    _run(tree, stub)
    assert _run(_changed(tree, "pretrain", "optim.lr", 2e-3), stub) == ["pretrain"]


@pytest.mark.parametrize(
    "package, reruns",
    [("torch", ["pretrain"]), ("tokenizers", ["tokenizer", "tokens", "pretrain"]), ("xxhash", [])],
)
def test_dependency_versions_are_in_the_keys_of_the_stages_they_change(tmp_path, stub, monkeypatch, package, reruns):
    tree = recipe_tree(tmp_path)
    _run(tree, stub)
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "999.0" if name == package else real(name))
    assert _run(tree, stub) == reruns


def test_the_medfoundry_version_is_in_every_key(tmp_path, stub, monkeypatch):
    tree = recipe_tree(tmp_path)
    _run(tree, stub)
    monkeypatch.setattr(runner, "__version__", "999.0")
    assert _run(tree, stub) == ALL


def test_evals_default_benchmarks_dir_is_keyed_as_resolved(tmp_path, stub, monkeypatch):
    """An eval that does not name its benchmarks directory reads $MEDFOUNDRY_BENCHMARKS: pointing it elsewhere,
    or a changed file in it, reruns the eval."""
    tree = recipe_tree(tmp_path)
    tree["stages"]["eval"] = {"tasks": ["pubmedqa"], "limit": 2}
    first, second = tmp_path / "a" / "benchmarks", tmp_path / "b" / "benchmarks"
    for folder in (first, second):
        (folder / "pubmedqa").mkdir(parents=True)
        (folder / "pubmedqa" / "test.json").write_text("{}")
    monkeypatch.setenv("MEDFOUNDRY_BENCHMARKS", str(first))
    assert _run(tree, stub) == [*ALL, "eval"]
    assert _run(tree, stub) == []
    monkeypatch.setenv("MEDFOUNDRY_BENCHMARKS", str(second))
    assert _run(tree, stub) == ["eval"]
    data = second / "pubmedqa" / "test.json"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert _run(tree, stub) == ["eval"]


@pytest.mark.parametrize(
    "old",
    [
        {"corpus": {"key": "0" * 32, "status": "done", "started": 1.0}, "tokenizer": "done"},
        {"corpus": {"status": "done"}, "tokens": None},
        ["corpus"],
    ],
)
def test_an_older_stages_json_reruns_every_stage(tmp_path, stub, old):
    tree = recipe_tree(tmp_path)
    _run(tree, stub)
    (Path(tree["run_dir"]) / "stages.json").write_text(json.dumps(old))
    assert _run(tree, stub) == ALL
    assert _run(tree, stub) == []


def test_a_run_removes_the_temporary_files_a_killed_one_left(tmp_path, stub):
    """A kill while ``stages.json`` (or a stage's config) is written leaves its hidden temporary file."""
    tree = recipe_tree(tmp_path)
    _run(tree, stub)
    run = Path(tree["run_dir"])
    leftovers = [run / ".stages.json.k1ll3d00.tmp", run / "configs" / ".pretrain.yaml.k1ll3d00.tmp"]
    for path in leftovers:
        path.write_text("{")
    assert _run(tree, stub) == []
    assert not any(path.exists() for path in leftovers)
