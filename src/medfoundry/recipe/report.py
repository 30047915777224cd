"""``run_dir/report.md``: one page for a run, linking every stage's manifest, report and plots; each stage's
section is read from its typed manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

from medfoundry import __version__
from medfoundry.io import write_text
from medfoundry.manifest import Manifest
from medfoundry.recipe.config import RecipeConfig

# what each stage leaves that a reader wants to open, relative to its directory
LINKS = {
    "corpus": ("report.md", "manifest.json", "composition.png"),
    "tokenizer": ("fertility.md", "manifest.json", "tokenizer.json"),
    "tokens": ("manifest.json",),
    "pretrain": ("manifest.json", "run.json", "metrics.jsonl", "plots/loss.png", "model"),
    "finetune": ("manifest.json", "run.json", "metrics.jsonl", "data/report.md", "plots/loss.png", "model"),
    "eval": ("results.md", "manifest.json"),
    "generate": ("samples.jsonl", "manifest.json"),
}


def write_report(recipe: RecipeConfig, run: Path, state: dict) -> Path:
    lines = [f"# Run `{recipe.name}`", ""]
    if recipe.description:
        lines += [recipe.description.strip(), ""]
    lines += [
        f"medfoundry {__version__}; the recipe as run: [recipe.yaml](recipe.yaml); each stage's config: "
        "`configs/<stage>.yaml`; stage keys and times: [stages.json](stages.json).",
        "",
        "| stage | status | seconds | key | outputs |",
        "|---|---|---:|---|---|",
    ]
    for stage in recipe.present():
        entry = state.get(stage, {})
        links = " · ".join(f"[{Path(href).name}]({href})" for href in _links(run, stage))
        seconds = f"{entry['seconds']:,.0f}" if "seconds" in entry else ""
        lines.append(
            f"| {stage} | {entry.get('status', 'not run')} | {seconds} | `{entry.get('key', '')[:12]}` | {links} |"
        )
    for stage in recipe.present():
        if state.get(stage, {}).get("status") == "done":
            lines += ["", *SECTIONS[stage](run / stage, Manifest.read(run / stage, stage))]
    path = run / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _links(run: Path, stage: str) -> list[str]:
    """Paths, relative to the run directory, of the stage's outputs that exist."""
    if stage == "card":
        return ["MODEL_CARD.md"] if (run / "MODEL_CARD.md").is_file() else []
    return [f"{stage}/{name}" for name in LINKS.get(stage, ()) if (run / stage / name).exists()]


def _corpus(out: Path, manifest: Manifest) -> list[str]:
    counts = manifest.counts
    lines = [
        "## Corpus",
        "",
        f"{counts['documents_in']:,} documents read; {counts['documents_train']:,} train and "
        f"{counts['documents_val']:,} validation documents kept. Details: [report](corpus/report.md).",
    ]
    if (out / "composition.png").is_file():
        lines += ["", "![composition](corpus/composition.png)"]
    return lines


def _tokenizer(out: Path, manifest: Manifest) -> list[str]:
    fertility = manifest.details["fertility"]
    ours = fertility["medfoundry"]["tokens_per_word"]
    others = ", ".join(f"{name} {f['tokens_per_word']:.3f}" for name, f in fertility.items() if name != "medfoundry")
    return [
        "## Tokenizer",
        "",
        f"{manifest.counts['vocab_size']:,} tokens; {ours:.3f} tokens per held-out word"
        f"{f' (vs {others})' if others else ''}. Details: [fertility](tokenizer/fertility.md).",
    ]


def _tokens(out: Path, manifest: Manifest) -> list[str]:
    counts = ", ".join(f"{split} {manifest.counts[f'{split}_tokens']:,}" for split in manifest.outputs)
    return ["## Tokens", "", f"Token shards: {counts} tokens."]


def _training(title: str, stage: str):
    def section(out: Path, manifest: Manifest) -> list[str]:
        summary = manifest.details
        lines = [
            f"## {title}",
            "",
            f"{summary.get('steps', 0):,} steps, {summary.get('tokens') or 0:,} tokens, "
            f"median {summary.get('median_tok_s', 0):,.0f} tokens/s.",
        ]
        if "val_loss" in summary:
            ppl = (
                f" (perplexity {summary['initial_val_ppl']:,.1f} -> {summary['val_ppl']:,.1f})"
                if "val_ppl" in summary
                else ""
            )
            lines.append(f"Validation loss {summary['initial_val_loss']:.3f} -> {summary['val_loss']:.3f}{ppl}.")
        if (out / "plots" / "loss.png").is_file():
            lines += ["", f"![loss]({stage}/plots/loss.png)"]
        return lines

    return section


def _eval(out: Path, manifest: Manifest) -> list[str]:
    table = (out / manifest.outputs["report"]).read_text(encoding="utf-8").strip().lstrip("# ")
    return ["## Evaluation", "", re.sub(r"\]\((?![a-z]+:|/)", "](eval/", table)]  # its links, from the run directory


def _generate(out: Path, manifest: Manifest) -> list[str]:
    lines = ["## Samples", ""]
    samples = (out / manifest.outputs["samples"]).read_text(encoding="utf-8").splitlines()
    for line in samples[:3]:
        record = json.loads(line)
        lines += [f"**Prompt:** {record['prompt']}", "", "```text", record["completion"].strip(), "```", ""]
    return lines


def _card(out: Path, manifest: Manifest) -> list[str]:
    return ["## Model card", "", "[MODEL_CARD.md](MODEL_CARD.md), also the README.md of the model directory."]


SECTIONS = {
    "corpus": _corpus,
    "tokenizer": _tokenizer,
    "tokens": _tokens,
    "pretrain": _training("Pretraining", "pretrain"),
    "finetune": _training("Fine-tuning", "finetune"),
    "eval": _eval,
    "generate": _generate,
    "card": _card,
}
