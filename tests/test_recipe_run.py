"""`medfoundry run`: a tiny recipe end to end on real abstracts, then the cache: a rerun does nothing, a
changed stage reruns with everything after it (the old output kept aside), a changed input file reruns
its stage, --from / --until, an interrupted stage resumes in place, and recipe errors name their field."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import shared
from medfoundry import __version__
from medfoundry.config import validate
from medfoundry.errors import ConfigError
from medfoundry.manifest import Manifest, output_fingerprint
from medfoundry.recipe.config import RecipeConfig, wire
from medfoundry.recipe.runner import load_recipe, run_recipe

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


def test_from_and_until(first_run):
    tree, _, root = first_run
    assert _ran(_run(tree, root, start="eval")) == ["eval", "generate"]
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
