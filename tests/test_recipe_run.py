"""`medfoundry run`: a tiny recipe end to end on real abstracts, then the cache: a rerun does nothing, a
changed stage reruns with everything after it (the old output kept aside), a changed input file reruns
its stage, --from / --until, an interrupted stage resumes in place, and recipe errors name their field.
With a `distributed:` section: pretraining on 2 processes that the runner starts under torchrun, and a
Slurm job submitted, waited for (exit code 75) and continued from, with stand-ins for Slurm's commands."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, shared
from medfoundry import __version__
from medfoundry.config import load_yaml, validate
from medfoundry.errors import ConfigError, Pending
from medfoundry.manifest import Manifest, output_fingerprint
from medfoundry.recipe import runner
from medfoundry.recipe.config import RecipeConfig, wire
from medfoundry.recipe.runner import load_recipe, run_recipe
from test_launch import fake_slurm, free_port  # noqa: F401  (fake_slurm: Slurm's commands, stand-ins)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def abstracts(tmp_path_factory) -> Path:
    """The first 400 real PubMed abstracts of the shared sample, as a corpus source."""
    source = shared("corpus/pubmed_abstracts.jsonl.gz")
    out = tmp_path_factory.mktemp("recipe_inputs") / "abstracts.jsonl"
    with gzip.open(source, "rt", encoding="utf-8") as fh:
        out.write_text("".join(line for _, line in zip(range(400), fh)))
    return out


def recipe_tree(abstracts: Path, run_dir: Path, **stages) -> dict:
    tree = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "description": "A test run.",
        "stages": {
            "corpus": {
                "workers": 1,
                "sources": [
                    {
                        "name": "abstracts",
                        "kind": "jsonl",
                        "paths": [str(abstracts)],
                        "fields": {"text": ["title", "abstract"], "id": "pmid"},
                    }
                ],
                "decontam": {"enabled": False},
                "split": {"val_fraction": 0.05},
            },
            "tokenizer": {"vocab_size": 1000, "fertility": {"top_domain_words": 0}},
            "tokens": {"workers": 1},
            "pretrain": {
                "model": {"preset": "gpt2-tiny", "context": 64},
                "training": {"steps": 6, "micro_batch_size": 4, "global_batch_size": 4, "precision": "fp32"},
                "checkpoint": {"every": 3},
                "eval": {"every": 3, "batches": 2},
            },
            "eval": {
                "tasks": [{"task": "heldout", "perplexity": {"path": "${run_dir}/corpus", "split": "val"}}],
                "limit": 10,
                "bootstrap_iters": 0,
            },
            "generate": {"prompts": ["The patient was treated with"], "sampling": {"max_tokens": 5}},
        },
    }
    tree["stages"].update(stages)
    return tree


def _run(tree: dict, tmp_path: Path, **options) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return run_recipe(load_recipe(path), log=lambda message: None, **options)


def _ran(summary: dict) -> list[str]:
    return [s for s, v in summary["stages"].items() if v["this_run"] == "ran"]


@pytest.fixture(scope="module")
def first_run(abstracts, tmp_path_factory) -> tuple[dict, dict, Path]:
    root = tmp_path_factory.mktemp("recipe")
    tree = recipe_tree(abstracts, root / "run")
    return tree, _run(tree, root), root


def test_every_stage_runs_and_the_report_links_them(first_run):
    _tree, summary, root = first_run
    run = root / "run"
    assert _ran(summary) == ["corpus", "tokenizer", "tokens", "pretrain", "eval", "generate"]
    state = json.loads((run / "stages.json").read_text())
    assert all(state[s]["status"] == "done" for s in summary["stages"])
    manifests = {s: Manifest.read(run / s, s) for s in summary["stages"]}  # every stage writes one, typed
    assert {m.medfoundry_version for m in manifests.values()} == {__version__}
    assert manifests["pretrain"].counts["steps"] == 6 and manifests["pretrain"].outputs["model"] == "model"
    assert manifests["pretrain"].inputs[str(run / "tokens")] == output_fingerprint(run / "tokens")
    assert manifests["generate"].counts["prompts"] == 1 and manifests["eval"].details["models"]["model"]
    assert (run / "pretrain" / "model" / "model.safetensors").is_file()
    results = json.loads((run / "eval" / "model" / "results.json").read_text())
    assert "heldout" in results["results"]
    sample = json.loads((run / "generate" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] == "The patient was treated with" and sample["completion_tokens"] > 0
    report = (run / "report.md").read_text()
    for text in (
        "## Corpus",
        "## Tokenizer",
        "## Pretraining",
        "## Evaluation",
        "## Samples",
        "(pretrain/plots/loss.png)",
    ):
        assert text in report
    assert yaml.safe_load((run / "recipe.yaml").read_text())["name"] == "tiny"


def test_each_stage_config_reruns_alone_with_its_own_command(first_run):
    from medfoundry.config import load_config
    from medfoundry.train.config import PretrainConfig

    _, _, root = first_run
    cfg = load_config(PretrainConfig, root / "run" / "configs" / "pretrain.yaml")
    assert cfg.data.tokens_dir == str(root / "run" / "tokens") and cfg.output_dir == str(root / "run" / "pretrain")


def test_a_rerun_is_all_cached(first_run):
    tree, _, root = first_run
    again = _run(tree, root)
    assert _ran(again) == [] and set(again["stages"]) == {
        "corpus",
        "tokenizer",
        "tokens",
        "pretrain",
        "eval",
        "generate",
    }


def test_a_changed_stage_reruns_with_what_follows_and_keeps_the_old_output(first_run, tmp_path):
    tree, _, root = first_run
    changed = json.loads(json.dumps(tree))
    changed["stages"]["pretrain"]["training"]["steps"] = 4
    summary = _run(changed, root)
    assert _ran(summary) == ["pretrain", "eval", "generate"]
    run = root / "run"
    old = [json.loads(line) for line in (run / ".previous" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in old) == 6 and max(r["step"] for r in new) == 4
    _run(tree, root)  # back to the recipe the other tests expect


def test_logging_and_checkpoint_retention_rerun_nothing(first_run):
    """Settings that change no output are not part of a stage's key: a real run stays cached."""
    tree, _, root = first_run
    changed = json.loads(json.dumps(tree))
    changed["stages"]["pretrain"]["log"] = {"every": 1}
    changed["stages"]["pretrain"]["checkpoint"]["keep_last"] = 5
    changed["stages"]["tokens"]["workers"] = 2
    assert _ran(_run(changed, root)) == []


def test_from_and_until(first_run, monkeypatch):
    """``--from eval`` reruns generate too, even when eval's rerun writes what it wrote before (here: its output
    fingerprint held at the first run's, as byte-identical manifests would give): generate's key alone would not
    move."""
    tree, _, root = first_run
    before, fingerprint = runner._output_fingerprint(root / "run", "eval"), runner._output_fingerprint
    monkeypatch.setattr(
        runner, "_output_fingerprint", lambda run, stage: before if stage == "eval" else fingerprint(run, stage)
    )
    assert _ran(_run(tree, root, start="eval")) == ["eval", "generate"]
    monkeypatch.undo()
    assert list(_run(tree, root, until="tokens")["stages"]) == ["corpus", "tokenizer", "tokens"]
    with pytest.raises(ConfigError, match="--from finetune: not a stage of this recipe"):
        _run(tree, root, start="finetune")


def test_a_changed_input_file_reruns_its_stage(abstracts, tmp_path):
    tree = recipe_tree(abstracts, tmp_path / "run")
    tree["stages"] = {"corpus": tree["stages"]["corpus"]}
    copy = tmp_path / "abstracts.jsonl"
    copy.write_text(abstracts.read_text())
    tree["stages"]["corpus"]["sources"][0]["paths"] = [str(copy)]
    assert _ran(_run(tree, tmp_path)) == ["corpus"]
    assert _ran(_run(tree, tmp_path)) == []
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _ran(_run(tree, tmp_path)) == ["corpus"]


def test_an_interrupted_stage_resumes_in_place(first_run):
    """A stage recorded as running with the same key runs again into its directory (training resumes from
    its checkpoints) instead of being moved aside."""
    tree, _, root = first_run
    run = root / "run"
    state = json.loads((run / "stages.json").read_text())
    state["pretrain"]["status"] = "running"
    (run / "stages.json").write_text(json.dumps(state))
    before = (run / "pretrain" / "metrics.jsonl").read_text()
    shutil_previous = run / ".previous" / "pretrain"
    previous_mtime = shutil_previous.stat().st_mtime_ns if shutil_previous.exists() else None
    assert _ran(_run(tree, root)) == ["pretrain", "eval", "generate"]
    assert (run / "pretrain" / "metrics.jsonl").read_text().startswith(before.splitlines()[0])
    now = shutil_previous.stat().st_mtime_ns if shutil_previous.exists() else None
    assert now == previous_mtime  # nothing was moved aside


def test_dry_run_writes_nothing(abstracts, tmp_path):
    summary = _run(recipe_tree(abstracts, tmp_path / "run"), tmp_path, dry_run=True)
    assert {v["this_run"] for v in summary["stages"].values()} == {"would run"}
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"pretrain": {"output_dir": "elsewhere", "model": {"preset": "gpt2-tiny"}, "training": {"steps": 1}}},
            "stages.pretrain.output_dir: set by the runner",
        ),
        ({"pretrain": {"model": {"preset": "gpt2-tiny"}, "training": {"step": 1}}}, "stages.pretrain"),
        ({"pretraining": {}}, "pretraining: unknown field"),
    ],
)
def test_recipe_errors_name_the_field(abstracts, tmp_path, change, message):
    tree = recipe_tree(abstracts, tmp_path / "run", **change)
    with pytest.raises(ConfigError, match=message):
        wire(validate(RecipeConfig, tree))


def test_eval_alone_needs_models(tmp_path):
    tree = {"name": "x", "run_dir": str(tmp_path), "stages": {"eval": {"tasks": ["pubmedqa"]}}}
    with pytest.raises(ConfigError, match="stages.eval.models"):
        wire(validate(RecipeConfig, tree))


def test_generate_is_wired_to_the_run_model(tmp_path):
    """The generate stage takes `medfoundry generate`'s config: the runner gives it the run's model and its output."""
    run = tmp_path / "run"
    generate = {"prompts": ["The patient"], "sampling": {"max_tokens": 3, "temperature": 0.5, "seed": 1}}
    tree = {
        "name": "g",
        "run_dir": str(run),
        "stages": {"eval": {"models": ["base"], "tasks": ["pubmedqa"]}, "generate": generate},
    }
    cfg = wire(validate(RecipeConfig, tree))["generate"]
    assert cfg.model == "base" and cfg.output == str(run / "generate" / "samples.jsonl")
    assert (cfg.sampling.max_tokens, cfg.sampling.temperature, cfg.sampling.seed) == (3, 0.5, 1)
    for field in ("model", "output"):
        given = {**tree, "stages": {**tree["stages"], "generate": {**generate, field: "elsewhere"}}}
        with pytest.raises(ConfigError, match=f"stages.generate.{field}: set by the runner"):
            wire(validate(RecipeConfig, given))
    with pytest.raises(ConfigError, match="no model to generate with"):
        wire(validate(RecipeConfig, {**tree, "stages": {"generate": generate}}))
    with pytest.raises(ConfigError, match="max_tokens: sampling fields go under sampling"):
        wire(
            validate(
                RecipeConfig, {**tree, "stages": {**tree["stages"], "generate": {"prompts": ["x"], "max_tokens": 3}}}
            )
        )


# ---------------------------------------------------------------------------------------------- distributed

FAST_PRETRAIN = {
    "model": {"preset": "gpt2-tiny", "context": 64},
    "training": {"steps": 4, "micro_batch_size": 4, "global_batch_size": 8, "precision": "fp32"},
    "schedule": {"kind": "cosine", "warmup_steps": 1},
    "checkpoint": {"every": 2},
    "eval": {"every": 2, "batches": 2},
    "distributed": {"strategy": "fsdp", "backend": "gloo"},
}


def _command(recipe: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medfoundry", "run", str(recipe)],
        cwd=REPO,
        env={**os.environ, "MEDFOUNDRY_NO_TCMALLOC": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _world_size(run: Path) -> int:
    return json.loads((run / "pretrain" / "run.json").read_text())["world_size"]


def test_the_distributed_quickstart_pretrains_on_two_processes(abstracts, tmp_path):
    """recipes/quickstart_distributed.yaml, shortened, through `medfoundry run`: the runner starts pretraining
    under torchrun on 2 processes (FSDP2, gloo), the first writes the manifest, the recipe goes on to eval."""
    tree = load_yaml(REPO / "recipes" / "quickstart_distributed.yaml")
    assert tree["distributed"] == {"launcher": "torchrun", "nproc_per_node": 2}
    run, stages = tmp_path / "run", tree["stages"]
    tree["run_dir"] = str(run)
    stages["corpus"]["sources"][0]["paths"] = [str(abstracts)]
    stages["tokenizer"]["vocab_size"] = 1000
    stages["pretrain"] = {**stages["pretrain"], **FAST_PRETRAIN}
    stages["eval"]["limit"] = 10
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    planned = []
    run_recipe(load_recipe(recipe), dry_run=True, log=planned.append)
    assert any(m.startswith("run: pretrain: would run on 2 processes under torchrun") for m in planned)

    done = _command(recipe)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "run: pretrain: on 2 processes: " in done.stdout and "--standalone --nproc-per-node 2" in done.stdout
    assert done.stdout.count("pretrain: 4 steps") == 1  # the stage's summary, from the first process
    state = json.loads((run / "stages.json").read_text())
    assert [s for s, v in state.items() if v["status"] == "done"] == [
        "corpus",
        "tokenizer",
        "tokens",
        "pretrain",
        "eval",
    ]
    assert _world_size(run) == 2 and Manifest.read(run / "pretrain", "pretrain").counts["steps"] == 4
    assert json.loads((run / "eval" / "model" / "results.json").read_text())["results"]["heldout_ppl"]
    assert _ran(run_recipe(load_recipe(recipe), log=lambda message: None)) == []  # all cached


def test_a_slurm_recipe_is_submitted_waited_for_and_continued(abstracts, tmp_path, fake_slurm, monkeypatch):
    """launcher: slurm. The first run submits pretraining as a batch job and stops, pending (exit code 75);
    a rerun while the job is queued says so and submits nothing; once the job has ended without the stage's
    manifest (cancelled), a rerun submits it again, and this time the stand-in cluster runs it: 2 nodes of 1
    process, meeting at the first node (all on this machine); the next rerun finds the manifest and goes on."""
    run = tmp_path / "run"
    tree = recipe_tree(abstracts, run, pretrain=FAST_PRETRAIN)
    del tree["stages"]["generate"]
    tree["distributed"] = {
        "launcher": "slurm",
        "nnodes": 2,
        "nproc_per_node": 1,
        "slurm": {"partition": "cpu", "time": "00:30:00", "rdzv_port": free_port()},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))

    with pytest.raises(Pending, match="slurm job 1000 submitted"):
        run_recipe(load_recipe(recipe), log=lambda message: None)  # the cluster is busy: not run yet
    script = (run / "slurm" / "pretrain.sbatch").read_text()
    assert (
        script == (fake_slurm / "job-1000.sh").read_text()
        and (fake_slurm / "job-1000.args").read_text() == "--parsable"
    )
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=cpu",
        "#SBATCH --time=00:30:00",
    ):
        assert line in script.splitlines()
    assert f"#SBATCH --output={run.resolve()}/slurm/pretrain-%j.out" in script
    assert script.rstrip().endswith(
        f"--nproc-per-node 1 -m medfoundry pretrain {(run / 'configs' / 'pretrain.yaml').resolve()}"
    )
    assert json.loads((run / "slurm" / "pretrain.json").read_text())["job_id"] == "1000"
    state = json.loads((run / "stages.json").read_text())
    assert {s: v["status"] for s, v in state.items()} == {
        "corpus": "done",
        "tokenizer": "done",
        "tokens": "done",
        "pretrain": "pending",
    }
    assert state["pretrain"]["job_id"] == "1000" and "| pretrain | pending |" in (run / "report.md").read_text()

    monkeypatch.setenv("FAKE_SLURM_ACTIVE", "1")  # queued
    waiting = _command(recipe)
    assert waiting.returncode == 75, waiting.stdout[-2000:] + waiting.stderr[-2000:]
    assert (
        "pending: run: pretrain: slurm job 1000 is still pending" in waiting.stdout and "exit code 75" in waiting.stdout
    )
    changed = json.loads(json.dumps(tree))
    changed["stages"]["pretrain"]["training"]["steps"] = 6
    recipe.write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError, match="slurm job 1000, submitted for the stage's previous config, is still"):
        run_recipe(load_recipe(recipe), log=lambda message: None)
    recipe.write_text(yaml.safe_dump(tree))
    assert not (fake_slurm / "job-1001.sh").exists()

    monkeypatch.setenv("FAKE_SLURM_ACTIVE", "0")  # the job is gone without the manifest
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")  # the cluster runs the next job at once
    logs = []
    with pytest.raises(Pending, match="slurm job 1001 submitted"):
        run_recipe(load_recipe(recipe), log=logs.append)
    assert any("slurm job 1000 ended (CANCELLED) without writing" in m and "submitting it again" in m for m in logs)
    job_log = (run / "slurm" / "pretrain-1001.out").read_text()
    assert (fake_slurm / "job-1001.rc").read_text() == "0", job_log[-3000:]
    assert job_log.count("pretrain: 4 steps") == 1

    monkeypatch.setenv("FAKE_SLURM_RUN", "0")
    summary = run_recipe(load_recipe(recipe), log=logs.append)
    assert _ran(summary) == ["pretrain", "eval"] and "run: pretrain: done by slurm job 1001" in "\n".join(logs)
    state = json.loads((run / "stages.json").read_text())
    assert state["pretrain"]["status"] == "done" and state["pretrain"]["job_id"] == "1001"
    assert _world_size(run) == 2 and (run / "eval" / "model" / "results.json").is_file()
    assert len(list(fake_slurm.glob("job-*.sh"))) == 2
    assert _ran(run_recipe(load_recipe(recipe), log=lambda message: None)) == []
