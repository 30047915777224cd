"""`medfoundry eval` as a user runs it: flags or a config file, a short table, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, shared
from test_eval_run import tiny_model

ENV = {
    **os.environ,
    "MEDFOUNDRY_NO_TCMALLOC": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}


def medfoundry_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medfoundry", "eval", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    shared("benchmarks")
    return tiny_model(tmp_path_factory.mktemp("cli_model") / "tiny0", 0)


def test_flags_evaluate_and_print_a_table(model, tmp_path):
    out = tmp_path / "out"
    done = medfoundry_eval(
        "--model",
        str(model),
        "--tasks",
        "pubmedqa,mmlu_anatomy",
        "--limit",
        "3",
        "--output",
        str(out),
        "--set",
        "threads=1",
        "--set",
        "bootstrap_iters=50",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["Model", "PubMedQA", "MMLU", "anatomy", "Avg"] and lines[1].split()[0] == "tiny0"
    assert (
        f"tiny0: {out / 'tiny0' / 'results.json'}" in done.stdout
        and f"eval: comparison -> {out / 'results.md'}" in done.stdout
    )
    assert json.loads((out / "tiny0" / "results.json").read_text())["n-samples"]["mmlu_anatomy"]["effective"] == 3


def test_config_file_with_flag_overrides(model, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "from_file"),
                "models": [str(model)],
                "tasks": ["medmcqa"],
                "limit": 50,
                "threads": 1,
                "bootstrap_iters": 0,
            }
        )
    )
    done = medfoundry_eval(str(config), "--limit", "2", "--prompt-style", "meditron", "--quiet")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "from_file" / "tiny0" / "results.json").read_text())
    assert results["n-samples"]["medmcqa"]["effective"] == 2 and results["config"]["prompt_style"] == "meditron"


def _bad_task_folder(path):
    path.mkdir()
    (path / "drugs.jsonl").write_text('{"stem": "Aspirin inhibits", "answer": "COX"}\n')
    (path / "drugs.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "drugs",
                "data": {"path": str(path / "drugs.jsonl")},
                "splits": {"test": {}},
                "choices": ["COX", "ACE"],
                "target": {"field": "answer"},
                "prompts": {"lm_eval": {"text": "{{ stemm }}"}},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tasks", "pubmedq"], "error: unknown task 'pubmedq'; did you mean 'pubmedqa'?"),
        (
            ["--tasks", "medqa_4options", "--num-fewshot", "3"],
            "error: task medqa_4options: 3-shot prompts need demonstrations, but MedQA's train and dev splits are "
            "not in ../shared/data, only its test set. Set fewshot_source=TASK[:SPLIT]",
        ),
        (
            ["--tasks", "pubmedqa", "--set", "benchmarks_dir=/nonexistent"],
            "error: task pubmedqa ({tasks}/pubmedqa.yaml): data file /nonexistent/pubmedqa/ori_pqal.json not found. "
            "For the official files, set benchmarks_dir in the eval config (or --set benchmarks_dir=DIR) or the "
            "MEDFOUNDRY_BENCHMARKS environment variable to the folder of the benchmark files (laid out like "
            "../shared/data/benchmarks); its hub loader (bigbio/pubmed_qa) failed: ConnectionError",
        ),
        (
            ["--tasks", "drugs", "--set", "task_dirs=[{tmp}/mine]"],
            "error: {tmp}/mine/drugs.yaml: prompts.lm_eval.text: 'stemm' is undefined "
            "(the documents have the fields answer, stem)",
        ),
        (["--tasks", "pubmedqa", "--set", "generation.samples=3"], "error: <overrides>: invalid configuration"),
    ],
)
def test_errors_are_one_clear_line(model, tmp_path, args, expected):
    _bad_task_folder(tmp_path / "mine")
    tasks = REPO / "src" / "medfoundry" / "eval" / "tasks"
    args = [a.format(tmp=tmp_path) for a in args]
    done = medfoundry_eval("--model", str(model), "--output", str(tmp_path / "out"), *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(expected.format(tmp=tmp_path, tasks=tasks)), done.stderr
    assert "Traceback" not in done.stderr and (expected.endswith("configuration") or done.stderr.count("\n") == 1)
