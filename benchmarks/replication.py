"""A small-scale replication of BioMedLM's, BioMed-LLaMA's and Meditron's findings on this machine.

Runs ``medfoundry run recipes/replication-cpu-noreplay.yaml`` and then ``recipes/replication-cpu.yaml``
(one to two hours on 2 cores; stages already done are cached, so a rerun only reports), then reads
their artifacts and prints three tables and, as its last line, one JSON object:

- BioMedLM: tokens per held-out word of the domain tokenizer vs GPT-2's (tokenizer stage's fertility);
- BioMed-LLaMA: rows = models (SmolLM2-135M-Instruct, continued without replay, continued with 1% replay),
  columns = perplexity on held-out PubMed abstracts and PMC full text, then accuracy on MedQA (4 and 5
  options), MedMCQA, PubMedQA and MMLU-medical (the first 200 questions of each, zero-shot);
- Meditron: general-domain perplexity (held-out replay documents neither run trained on) before and
  after continued pretraining, with and without replay.

JSON keys: ``fertility`` ({tokenizer: tokens per word}), ``models`` ({model: {task: value}}),
``findings`` (each finding's direction as a boolean), ``seconds`` (per recipe), ``run_dirs``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("replication-cpu-noreplay", "replication-cpu")
PERPLEXITY = {"ppl_abstracts": "PubMed abstracts", "ppl_pmc": "PMC full text", "ppl_general": "General domain"}
ACCURACY = {
    "medqa_4options": "MedQA-4",
    "medqa_5options": "MedQA-5",
    "medmcqa": "MedMCQA",
    "pubmedqa": "PubMedQA",
    "mmlu_medical": "MMLU-med",
}
NAMES = {
    "SmolLM2-135M-Instruct.Q4_1": "SmolLM2-135M-Instruct",
    "model": "+ PubMed, 1% replay",
    "model-2": "+ PubMed, no replay",
}


def run(recipe: str) -> float:
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "medfoundry", "run", str(REPO / "recipes" / f"{recipe}.yaml")], cwd=REPO, check=True
    )
    return round(time.time() - started, 1)


def model_scores(eval_dir: Path) -> dict[str, dict[str, float]]:
    """{model: {task: word perplexity or accuracy}} from each model's results.json."""
    scores = {}
    for results in sorted(eval_dir.glob("*/results.json")):
        tasks = json.loads(results.read_text())["results"]
        row = {t: tasks[t]["word_perplexity,none"] for t in PERPLEXITY if t in tasks}
        row.update({t: tasks[t]["acc,none"] for t in ACCURACY if t in tasks})
        scores[NAMES.get(results.parent.name, results.parent.name)] = row
    return scores


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    seconds = {recipe: run(recipe) for recipe in RECIPES}
    run_dir = REPO / "runs" / "replication-cpu"
    fertility = {
        name: f["tokens_per_word"]
        for name, f in json.loads((run_dir / "tokenizer" / "manifest.json").read_text())["details"]["fertility"].items()
    }
    models = model_scores(run_dir / "eval")
    base, replay, plain = (models.get(NAMES[k], {}) for k in ("SmolLM2-135M-Instruct.Q4_1", "model", "model-2"))
    findings = {
        "domain_tokenizer_fewer_tokens_per_word": fertility["medfoundry"] < fertility["gpt2"],
        "continued_pretraining_lowers_abstract_ppl": replay["ppl_abstracts"] < base["ppl_abstracts"],
        "continued_pretraining_lowers_pmc_ppl": replay["ppl_pmc"] < base["ppl_pmc"],
        "general_ppl_rises_without_replay": plain["ppl_general"] > base["ppl_general"],
        "replay_reduces_general_ppl_rise": replay["ppl_general"] < plain["ppl_general"],
    }
    print("BioMedLM: tokens per held-out PubMed word\n")
    print(table(["tokenizer", "tokens / word"], [[n, f"{v:.3f}"] for n, v in fertility.items()]))
    columns = [*PERPLEXITY, *ACCURACY]
    print("\nBioMed-LLaMA / Meditron: word perplexity (lower is better) and zero-shot accuracy\n")
    titles = PERPLEXITY | ACCURACY
    print(
        table(
            ["model", *[titles[c] for c in columns]],
            [[name, *[_cell(row.get(c), c in PERPLEXITY) for c in columns]] for name, row in models.items()],
        )
    )
    print("\nFindings:", json.dumps(findings, indent=1))
    print(
        json.dumps(
            {
                "fertility": fertility,
                "models": models,
                "findings": findings,
                "seconds": seconds,
                "run_dirs": [str(REPO / "runs" / r) for r in RECIPES],
            }
        )
    )


def _cell(value: float | None, perplexity: bool) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if perplexity else f"{100 * value:.1f}"


if __name__ == "__main__":
    main()
