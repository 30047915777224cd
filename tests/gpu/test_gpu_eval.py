"""Evaluation on CUDA: log-likelihood and perplexity tasks give the CPU's predictions and scores (fp32), bf16 runs,
and chain-of-thought samples with seeds through the engine on the GPU.

Mirrors ``tests/test_eval_run.py`` (tiny random GPT-2 models, the official benchmark files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ci_skips import MACHINE
from medfoundry.eval.run import evaluate
from test_eval_run import config, models, samples  # noqa: F401  (models: the shared tiny-model fixture)

pytestmark = pytest.mark.gpu

TASKS = ["pubmedqa", "medqa_4options", "mmlu_medical"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpu_eval") / "heldout.jsonl"
    texts = [
        "Aspirin irreversibly inhibits cyclooxygenase.",
        "Metformin lowers hepatic glucose output.",
        "Statins inhibit HMG-CoA reductase and lower LDL cholesterol.",
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _tasks(heldout: Path) -> list:
    return [*TASKS, {"task": "heldout", "perplexity": {"path": str(heldout)}}]


def test_evaluation_on_cuda_matches_the_cpu(models, heldout, tmp_path):
    runs = {
        device: evaluate(config(tmp_path / device, models[:1], tasks=_tasks(heldout), limit=4, device=device))
        for device in ("cuda", "cpu")
    }
    gpu, cpu = (runs[d]["models"][0]["results"] for d in ("cuda", "cpu"))
    assert gpu["config"]["device"].startswith("cuda") and cpu["config"]["device"] == "cpu"
    assert gpu == json.loads((tmp_path / "cuda" / "tiny0" / "results.json").read_text())
    a, b = samples(tmp_path / "cuda" / "tiny0"), samples(tmp_path / "cpu" / "tiny0")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["context"] == y["context"] and x["loglik"] == pytest.approx(y["loglik"], abs=1e-3)
    assert gpu["results"]["heldout"]["token_perplexity,none"] == pytest.approx(
        cpu["results"]["heldout"]["token_perplexity,none"], rel=1e-4
    )


@pytest.mark.skipif(
    not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(), reason=MACHINE + "needs a GPU with bf16"
)
def test_bf16_evaluation_on_cuda(models, heldout, tmp_path):
    summary = evaluate(
        config(tmp_path / "bf16", models[:1], tasks=_tasks(heldout), limit=4, device="cuda", precision="bf16")
    )
    results = summary["models"][0]["results"]
    assert (results["config"]["device"], results["config"]["precision"]) == ("cuda", "bf16")
    assert all(s["prediction"] is not None for s in samples(tmp_path / "bf16" / "tiny0"))
    assert results["results"]["heldout"]["token_perplexity,none"] > 1


def test_chain_of_thought_samples_on_cuda(models, tmp_path):
    """Self-consistency draws 3 sampled completions per question on the GPU; the same seed draws them again."""
    generation = {"max_tokens": 6, "temperature": 0.9, "samples": 3}
    for name in ("first", "again"):
        evaluate(
            config(
                tmp_path / name,
                models[:1],
                tasks=["pubmedqa"],
                limit=3,
                mode="cot",
                generation=generation,
                device="cuda",
                batch_size=4,
            )
        )
    first, again = samples(tmp_path / "first" / "tiny0"), samples(tmp_path / "again" / "tiny0")
    assert all(len(s["completions"]) == 3 for s in first)
    assert [s["completions"] for s in first] == [s["completions"] for s in again]
