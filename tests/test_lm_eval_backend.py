"""lm-eval's ``medfoundry`` model: the same answers as lm-eval's ``hf`` model through ``lm_eval.simple_evaluate`` on
local task YAMLs (multiple choice with shared few-shot prefixes, rolling perplexity over several windows, greedy
generation), the installed startup hook (``lm_eval --model medfoundry`` from lm-eval's own command, nothing
imported at interpreter start), and ``medfoundry eval --lm-eval-tasks``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from medfoundry.errors import ConfigError
from test_eval_loglik import WORDS, llama_dir  # noqa: F401 (module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {
    **os.environ,
    "MEDFOUNDRY_NO_TCMALLOC": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}
MAX_LENGTH = 96  # a context window this small cuts the long documents into several rolling windows
BIN = Path(sys.executable).parent


def text(n_words: int, offset: int) -> str:
    return " ".join(WORDS[(offset + 7 * i) % len(WORDS)] for i in range(n_words))


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Three tasks over local JSONL files: mf_mc (multiple choice, 2-shot from its train split), mf_ppl
    (loglikelihood_rolling, documents from 1 to ~300 tokens) and mf_gen (generate_until, stop at a newline)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    questions = [
        {"question": text(4 + 3 * i, i), "choices": [" yes", " no", " " + text(3, i + 1)], "answer": i % 3}
        for i in range(10)
    ]
    mc = {
        "test": write_jsonl(root / "mc_test.jsonl", questions[:6]),
        "train": write_jsonl(root / "mc_train.jsonl", questions[6:]),
    }
    docs = [{"text": text(n, n)} for n in (1, 12, 150, 220)]
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    definitions = {
        "mf_mc": {
            **common,
            "dataset_kwargs": {"data_files": mc},
            "fewshot_split": "train",
            "num_fewshot": 2,
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
        "mf_ppl": {
            **common,
            "dataset_kwargs": {"data_files": {"test": write_jsonl(root / "ppl.jsonl", docs)}},
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        },
        "mf_gen": {
            **common,
            "dataset_kwargs": {"data_files": {"test": mc["test"]}},
            "output_type": "generate_until",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices[answer]}}",
            "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
    }
    for name, definition in definitions.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **definition}), encoding="utf-8")
    return root


@pytest.fixture
def no_env_info(monkeypatch):
    """lm-eval records its environment with torch's collect_env (``pip list`` and more in subprocesses, seconds per
    run); the tests do without."""
    import lm_eval.evaluator

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def evaluate(model: str, model_dir: Path, tasks_dir: Path, names: list[str]) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args={"pretrained": str(model_dir), "dtype": "float32", "max_length": MAX_LENGTH},
        tasks=names,
        device="cpu",
        batch_size=4,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


def responses(results: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_medfoundry_equals_hf_on_every_request_type(llama_dir, tasks_dir, no_env_info):
    """A LLaMA-style tokenizer that adds BOS (so rolling windows score it after the prefix token), few-shot
    contexts sharing their exemplars, documents longer than the window: every log-likelihood within 1e-4,
    every greedy flag, prediction and generated text the same."""
    import medfoundry.eval.lm_eval_backend  # noqa: F401 (registers the model)

    names = ["mf_mc", "mf_ppl", "mf_gen"]
    ours, theirs = (evaluate(model, llama_dir, tasks_dir, names) for model in ("medfoundry", "hf"))
    mc_ours, mc_theirs = responses(ours, "mf_mc"), responses(theirs, "mf_mc")
    flat = [[choice[0] for choice in doc] for doc in mc_ours], [[choice[0] for choice in doc] for doc in mc_theirs]
    for a, b in zip(*flat):
        assert [x for x, _ in a] == pytest.approx([y for y, _ in b], abs=1e-4)
        assert [g for _, g in a] == [g for _, g in b]
        assert max(range(len(a)), key=lambda i: a[i][0]) == max(range(len(b)), key=lambda i: b[i][0])
    assert ours["results"]["mf_mc"]["acc,none"] == theirs["results"]["mf_mc"]["acc,none"]
    rolling = [doc[0][0] for doc in responses(ours, "mf_ppl")], [doc[0][0] for doc in responses(theirs, "mf_ppl")]
    assert rolling[0] == pytest.approx(rolling[1], abs=1e-4)
    assert responses(ours, "mf_gen") == responses(theirs, "mf_gen")
    assert any(doc[0][0] for doc in responses(ours, "mf_gen"))  # something was generated


def test_model_args_are_checked(llama_dir):
    from medfoundry.eval.lm_eval_backend import MedfoundryLM

    with pytest.raises(ConfigError, match="unknown model_args revision"):
        MedfoundryLM(pretrained=str(llama_dir), revision="main")
    with pytest.raises(ConfigError, match="dtype=float16"):
        MedfoundryLM(pretrained=str(llama_dir), dtype="float16")
    with pytest.raises(ConfigError, match="pretrained=DIR"):
        MedfoundryLM()
    with pytest.raises(ConfigError, match="batch_size='big'"):
        MedfoundryLM(pretrained=str(llama_dir), batch_size="big")


def test_installed_hook_registers_lazily():
    """The .pth file of the installed package: lm-eval's registry finds the model in a fresh interpreter, and a
    plain interpreter start imports neither lm-eval nor torch."""
    pth = Path(sysconfig.get_paths()["purelib"]) / "medfoundry-lm-eval.pth"
    assert pth.is_file(), f"{pth} missing: reinstall medfoundry (pip install -e .)"
    start = (
        "import sys; print('torch' in sys.modules, 'lm_eval' in sys.modules, 'medfoundry_lm_eval_hook' in sys.modules)"
    )
    lookup = (
        "from lm_eval.api.registry import get_model; print(get_model('medfoundry').__name__, get_model('hf').__name__)"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", code], cwd="/", env=ENV, capture_output=True, text=True, timeout=120)
        for code in (start, lookup)
    ]
    assert [o.stdout.strip() for o in outputs] == ["False False True", "MedfoundryLM HFLM"], [o.stderr for o in outputs]


def test_lm_eval_command_runs_the_medfoundry_model(llama_dir, tasks_dir, tmp_path):
    """lm-eval's own console script, with --log_samples: its usual results and per-sample files. (Half a minute:
    lm-eval indexes its ~15,000 task files at every start.)"""
    done = subprocess.run(
        [
            str(BIN / "lm_eval"),
            "--model",
            "medfoundry",
            "--model_args",
            f"pretrained={llama_dir},dtype=float32",
            "--tasks",
            "mf_mc",
            "--include_path",
            str(tasks_dir),
            "--batch_size",
            "auto",
            "--limit",
            "3",
            "--log_samples",
            "--output_path",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    assert results["config"]["model"] == "medfoundry" and "acc,none" in results["results"]["mf_mc"]
    (samples_file,) = (tmp_path / "out").rglob("samples_mf_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 3 and all(len(s["resps"]) == 3 for s in samples)


def test_medfoundry_eval_runs_lm_eval_tasks(llama_dir, tasks_dir, tmp_path, no_env_info, capsys):
    """``medfoundry eval --lm-eval-tasks`` writes lm-eval's results.json and samples in the model's lm_eval folder,
    the stage's manifest records them, and its summary shows them."""
    from medfoundry.cli import main

    out = tmp_path / "out"
    args = ["eval", "--model", str(llama_dir), "--lm-eval-include", str(tasks_dir), "--output", str(out), "--quiet"]
    settings = ["--set", "precision=fp32", "--set", "bootstrap_iters=0", "--limit", "4"]
    assert main([*args, "--lm-eval-tasks", "mf_mc,mf_ppl", "--lm-eval-log-samples", *settings]) == 0
    folder = out / llama_dir.name / "lm_eval"
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert set(results["results"]) == {"mf_mc", "mf_ppl"} and "samples" not in results
    assert len((folder / "samples_mf_mc.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["details"]["lm_eval"][llama_dir.name]["mf_mc"] == results["results"]["mf_mc"]
    accuracy = results["results"]["mf_mc"]["acc,none"]
    assert f"lm-eval: {llama_dir.name}: mf_mc: acc {accuracy:.4f}," in capsys.readouterr().out
