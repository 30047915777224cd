"""`medfoundry card`: cards of real tiny runs made by the recipe runner (every stage; pretraining + eval;
fine-tuning only; eval only). The front matter parses and its model-index equals results.json, every section
is there with no placeholder, the hyperparameter table equals run.json, partial runs say what they lack, the
model directory gets the card as README.md, and a missing or corrupt artifact is an error naming the file."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, shared
from medfoundry.card import write_card
from medfoundry.card.sections import TITLES
from medfoundry.errors import ConfigError, InputError
from medfoundry.recipe.runner import load_recipe, run_recipe
from test_finetune import _base_model
from test_recipe_run import recipe_tree
from test_sft_dataset import write_sources
from test_sft_templates import make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PLACEHOLDER = re.compile(r"TODO|TBD|More Information Needed|\{\{|\}\}|\bNone\b|\b[Nn]a[Nn]\b|\bnull\b")
ENV = {**os.environ, "MEDFOUNDRY_NO_TCMALLOC": "1", "OMP_NUM_THREADS": "1"}


def _run(tree: dict, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(tree))
    run_recipe(load_recipe(root / "recipe.yaml"), log=lambda message: None)
    return Path(tree["run_dir"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Every stage on 400 real abstracts, benchmarks included; the runner writes the card (its `card` stage)."""
    root = tmp_path_factory.mktemp("card_full")
    abstracts = root / "abstracts.jsonl"
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt", encoding="utf-8") as fh:
        abstracts.write_text("".join(line for _, line in zip(range(400), fh)))
    tree = recipe_tree(abstracts, root / "run")
    tree["stages"]["eval"].update(
        tasks=["pubmedqa", "mmlu_medical", *tree["stages"]["eval"]["tasks"]],
        limit=3,
        benchmarks_dir=str(shared("benchmarks")),
        threads=1,
    )
    tree["card"] = {"license": "apache-2.0", "developers": "The medfoundry tests", "grid_intensity": 400}
    return _run(tree, root)


@pytest.fixture(scope="module")
def pretrain_eval_run(full_run, tmp_path_factory) -> Path:
    """Continued pretraining of the full run's model on its tokens (made outside this run), then evaluation
    beside the model it started from."""
    root = tmp_path_factory.mktemp("card_pretrain_eval")
    pretrain = {
        "model": {"preset": "gpt2-tiny", "context": 64, "init_from": str(full_run / "pretrain" / "model")},
        "data": {"tokens_dir": str(full_run / "tokens"), "tokenizer_dir": str(full_run / "tokenizer")},
        "training": {"steps": 3, "micro_batch_size": 2, "global_batch_size": 4, "precision": "fp32"},
        "eval": {"every": 3, "batches": 1},
        "log": {"every": 1},
    }
    evaluation = {
        "models": [str(full_run / "pretrain" / "model")],
        "tasks": ["pubmedqa"],
        "limit": 2,
        "benchmarks_dir": str(shared("benchmarks")),
        "threads": 1,
        "bootstrap_iters": 0,
    }
    run = _run(
        {"name": "continued", "run_dir": str(root / "run"), "stages": {"pretrain": pretrain, "eval": evaluation}}, root
    )
    write_card(run)
    return run


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card_finetune")
    base = _base_model(root / "gpt2", make_tokenizer(root / "tok"), "gpt2")
    sources = write_sources(root / "data")
    finetune = {
        "model": {"init_from": str(base)},
        "data": {
            "max_length": 256,
            "allow_test_overlap": True,
            "mixture": {"total": 120},
            "sources": [
                {"name": "defs", "path": str(sources["defs"]), "weight": 0.6},
                {"name": "dialogues", "path": str(sources["dialogues"]), "weight": 0.4},
            ],
        },
        "training": {"steps": 3, "micro_batch_size": 4, "global_batch_size": 8, "precision": "fp32"},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1},
        "eval": {"every": 3, "batches": 1},
        "log": {"every": 1},
    }
    card = {"license": "mit", "base_model": "openai-community/gpt2", "language": "en"}
    return _run(
        {"name": "tiny-sft", "run_dir": str(root / "run"), "stages": {"finetune": finetune}, "card": card}, root
    )


@pytest.fixture(scope="module")
def eval_only_run(full_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card_eval_only")
    evaluation = {
        "models": [str(full_run / "pretrain" / "model")],
        "tasks": ["pubmedqa"],
        "limit": 2,
        "benchmarks_dir": str(shared("benchmarks")),
        "threads": 1,
        "bootstrap_iters": 0,
    }
    run = _run({"name": "scored", "run_dir": str(root / "run"), "stages": {"eval": evaluation}}, root)
    write_card(run)
    return run


def _card(run: Path) -> tuple[dict, str]:
    """The card's front matter (parsed) and body."""
    content = (run / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert content.startswith("---\n")
    _, head, body = content.split("---\n", 2)
    return yaml.safe_load(head), body


def _section(body: str, title: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    level = re.match(r"#+", title).group()
    start = body.index(title + "\n")
    following = re.search(rf"^#{{1,{len(level)}}} ", body[start + len(title) :], re.M)
    return body[start : start + len(title) + following.start()] if following else body[start:]


def _table(text: str) -> dict[str, str]:
    """A two-column Markdown table as {first cell: second cell}."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")][2:]
    return {cells[0].strip(): cells[1].strip() for cells in rows}


def _results(run: Path, model: str = "model") -> dict:
    return json.loads((run / "eval" / model / "results.json").read_text())


def test_front_matter_parses_and_its_model_index_equals_results_json(full_run):
    from huggingface_hub.repocard_data import model_index_to_eval_results

    meta, _ = _card(full_run)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert {"medical", "biomedical"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert meta["metrics"] == ["accuracy", "perplexity"]
    assert meta["widget"] == [{"text": "The patient was treated with"}]
    name, parsed = model_index_to_eval_results(meta["model-index"])  # the Hub's own reader: the schema's shape
    assert name == "tiny"
    results = _results(full_run)
    expected = []
    for metrics in results["results"].values():
        perplexity = "word_perplexity,none" in metrics
        keys = [("word_perplexity", "perplexity")] if perplexity else [("acc", "acc"), ("acc_norm", "acc_norm")]
        expected += [(metric_type, metrics[f"{key},none"]) for key, metric_type in keys]
    assert [(r.metric_type, r.metric_value) for r in parsed] == expected
    pubmedqa = parsed[0]
    assert (pubmedqa.task_type, pubmedqa.dataset_type, pubmedqa.dataset_name, pubmedqa.dataset_split) == (
        "multiple-choice",
        "bigbio/pubmed_qa",
        "PubMedQA",
        "test",
    )
    assert pubmedqa.dataset_args == {"num_few_shot": 0} and pubmedqa.verified is False
    assert {r.dataset_name for r in parsed} >= {"MMLU-medical", "MMLU anatomy", "heldout"}


@pytest.mark.parametrize("name", ["full_run", "pretrain_eval_run", "finetune_run", "eval_only_run"])
def test_every_section_is_there_and_nothing_is_a_placeholder(name, request):
    run = request.getfixturevalue(name)
    content = (run / "MODEL_CARD.md").read_text(encoding="utf-8")
    _, body = _card(run)
    for title in TITLES:
        assert f"\n## {title}\n" in body, title
    assert PLACEHOLDER.search(content) is None, PLACEHOLDER.search(content).group()
    assert "\n\n\n" not in body and not re.search(r"\|[ \t]*\|", body)  # no empty table cell


def test_hyperparameter_table_equals_run_json(full_run, finetune_run):
    for run, stage, title in ((full_run, "pretrain", "### Pretraining"), (finetune_run, "finetune", "### Fine-tuning")):
        record = json.loads((run / stage / "run.json").read_text())
        cfg = record["config"]
        rows = _table(_section(_section(_card(run)[1], title), "#### Hyperparameters"))

        def number(label, rows=rows):
            return float(rows[label].replace(",", ""))

        assert number("Optimizer steps") == record.get("steps", cfg["training"]["steps"])
        assert number("Micro-batch size (sequences per process)") == cfg["training"]["micro_batch_size"]
        assert number("Global batch size (sequences)") == cfg["training"]["global_batch_size"]
        assert number("Gradient accumulation") == record["grad_accumulation"]
        context = cfg["model"]["context"] if stage == "pretrain" else cfg["data"]["max_length"]
        assert number("Context length (tokens)") == context
        assert number("Peak learning rate") == cfg["optim"]["lr"]
        assert number("Warmup steps") == cfg["schedule"]["warmup_steps"]
        assert rows["Schedule"] == cfg["schedule"]["kind"]
        assert [float(b) for b in rows["AdamW betas"].split(",")] == cfg["optim"]["betas"]
        assert number("AdamW epsilon") == cfg["optim"]["eps"] and number("Weight decay") == cfg["optim"]["weight_decay"]
        assert number("Gradient clipping (max norm)") == cfg["optim"]["grad_clip"]
        assert rows["Precision"] == record["precision"] and number("Processes (world size)") == record["world_size"]
        assert rows["Kernel: attention"] == record["kernels"]["attention"] and rows["Device"] == record["device"]
    summary = json.loads((finetune_run / "finetune" / "summary.json").read_text())
    rows = _table(_section(_card(finetune_run)[1], "#### Hyperparameters"))
    assert float(rows["Tokens seen"].replace(",", "")) == summary["tokens"]


def test_data_evaluation_and_environment_come_from_the_manifests(full_run):
    _, body = _card(full_run)
    corpus = json.loads((full_run / "corpus" / "manifest.json").read_text())
    tokens = json.loads((full_run / "tokens" / "manifest.json").read_text())
    train = corpus["details"]["per_source"]["train"]["abstracts"]
    row = next(line for line in _section(body, "### Pretraining corpus").splitlines() if line.startswith("| abstracts"))
    assert [c.strip() for c in row.strip("|").split("|")][2:5] == [
        f"{train['docs']:,}",
        f"{train['chars']:,}",
        f"{tokens['details']['source_tokens']['train']['abstracts']:,}",
    ]
    assert "not checked against evaluation sets (decontamination disabled)" in body
    fertility = json.loads((full_run / "tokenizer" / "fertility.json").read_text())
    assert f"{fertility['tokenizers']['medfoundry']['tokens_per_word']:.3f} tokens per word" in body
    results = _results(full_run)
    acc, stderr = results["results"]["pubmedqa"]["acc,none"], results["results"]["pubmedqa"]["acc_stderr,none"]
    assert f"| PubMedQA | loglik | 3 | 0 | {acc:.4f} ± {stderr:.4f} |" in body
    word_ppl = results["results"]["heldout"]["word_perplexity,none"]
    assert f"| {word_ppl:,.2f} |" in _section(body, "### Held-out perplexity")
    environment = _section(body, "## Environmental impact")
    assert "| pretrain | 1 x `cpu` |" in environment and "65 W (assumed" in environment
    assert "grid intensity of 400 gCO2eq/kWh" in environment and f"{os.cpu_count()} logical CPUs" in environment
    summary = json.loads((full_run / "pretrain" / "summary.json").read_text())
    assert f"{summary['val_loss']:.4f} after" in _section(body, "### Pretraining")
    assert "- **Developed by:** The medfoundry tests" in body and "`apply_chat_template`" not in body


def test_the_model_directory_gets_the_card_as_readme(full_run, finetune_run):
    for run, stage in ((full_run, "pretrain"), (finetune_run, "finetune")):
        assert (run / stage / "model" / "README.md").read_text() == (run / "MODEL_CARD.md").read_text()


def test_partial_runs_say_what_they_lack(pretrain_eval_run, finetune_run, eval_only_run, full_run):
    meta, body = _card(pretrain_eval_run)
    assert "This model was not fine-tuned by this run." in body
    assert f"prepared outside this run (`{full_run / 'tokens'}`)" in body
    assert f"continued-pretrained from `{full_run / 'pretrain' / 'model'}`" in body
    assert "license" not in meta and "not declared (the card section sets no `license`)" in body
    assert [r["dataset"]["name"] for r in meta["model-index"][0]["results"]] == ["PubMedQA"]
    ours, baseline = _results(pretrain_eval_run)["results"], _results(pretrain_eval_run, "model-2")["results"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == ours["pubmedqa"]["acc,none"]
    comparison = _section(body, "### Compared with the other evaluated models (accuracy)")
    assert f"| model (this model) | {ours['pubmedqa']['acc,none']:.4f} |" in comparison
    assert f"| model-2 | {baseline['pubmedqa']['acc,none']:.4f} |" in comparison

    meta, body = _card(finetune_run)
    assert meta["base_model"] == "openai-community/gpt2" and meta["license"] == "mit"
    assert "model-index" not in meta and "metrics" not in meta
    assert "This run did no pretraining: the fine-tuned model's base was pretrained elsewhere." in body
    assert "This model was not evaluated on benchmarks by this run (it has no evaluation stage)." in body
    assert "| defs | file `defs.jsonl` |" in body and "`chatml` chat template" in body
    assert "test overlap was allowed" in body and "apply_chat_template(messages" in body

    meta, body = _card(eval_only_run)
    assert "This run trained no model: it evaluated" in body and "| Parameters |" in body
    assert "This run trained no model, so it records no training data" in body
    # a card never writes into a model the run did not train
    assert (full_run / "pretrain" / "model" / "README.md").read_text() == (full_run / "MODEL_CARD.md").read_text()


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", ".work", "cache", "train", "val"))
    return out


def test_a_missing_or_corrupt_artifact_is_an_error_naming_the_file(full_run, tmp_path):
    run = _copy(full_run, tmp_path)
    results = run / "eval" / "model" / "results.json"
    results.write_text(results.read_text()[:100])
    with pytest.raises(InputError, match=re.escape(str(results)) + ":.*invalid JSON"):
        write_card(run)
    shutil.copy(full_run / "eval" / "model" / "results.json", results)
    (run / "pretrain" / "summary.json").unlink()
    summary = re.escape(str(run / "pretrain" / "summary.json"))
    with pytest.raises(InputError, match=summary + ": not found: the pretrain stage has not finished"):
        write_card(run)
    shutil.rmtree(run / "pretrain" / "model")
    (run / "pretrain" / "summary.json").write_text("{}")
    with pytest.raises(InputError, match=re.escape(str(run / "pretrain" / "model")) + ": not found"):
        write_card(run)
    with pytest.raises(InputError, match="no stage output here"):
        write_card(tmp_path)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "x", "card": {"licence": "mit"}}))
    with pytest.raises(ConfigError, match="licence: unknown field; did you mean 'license'"):
        write_card(run)


def test_the_command_writes_the_card_with_overrides_and_errors_in_one_line(pretrain_eval_run, tmp_path):
    run = _copy(pretrain_eval_run, tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfoundry",
            "card",
            str(run),
            "--set",
            "license=mit",
            "--set",
            "power_watts=100",
            "--set",
            "tags=[oncology]",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"card: {run / 'MODEL_CARD.md'}"
    meta, body = _card(run)
    assert meta["license"] == "mit" and "oncology" in meta["tags"] and "100 W (given in the card section)" in body
    (run / "eval" / "manifest.json").write_text("[]")
    done = subprocess.run(
        [sys.executable, "-m", "medfoundry", "card", str(run)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {run / 'eval' / 'manifest.json'}: expected a JSON object, got list"
