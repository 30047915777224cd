"""Scoring model outputs and writing them: ``results.json`` (lm-eval's layout and keys), ``samples.jsonl``
(every question: prompt, per-choice log-likelihoods or completions, prediction, target) and Markdown
reports, per model and side by side (rows = models, columns = benchmarks, as BioMed-LLaMA's table).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medfoundry.eval.answers import extract_answer, majority_vote
from medfoundry.eval.config import EvalConfig
from medfoundry.eval.metrics import NA, choice_predictions, summarize, summarize_group
from medfoundry.eval.tasks import Plan, display_title
from medfoundry.io import atomic_open, write_json, write_text

if TYPE_CHECKING:
    from medfoundry.eval.run import Prepared

PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")
ACC_NOTE = (
    "acc: the choice with the highest log-likelihood. acc_norm: log-likelihood divided by the choice's "
    "length in characters (lm-eval's definition: the choice string without its leading space, so it equals "
    "acc when the choices are single letters). acc_bytes: divided by its UTF-8 bytes. unparsed: share of "
    "chain-of-thought answers committing to no choice (counted wrong)."
)


@dataclass
class Scored:
    """One task's metrics (lm-eval keys), per-question values (for groups) and samples.jsonl records."""

    metrics: dict
    per_doc: dict[str, list[float]]
    samples: list[dict]
    higher_is_better: dict[str, bool]
    totals: dict | None = None


def score(p: Prepared, outputs, cfg: EvalConfig) -> Scored:
    scorer = {"loglik": _score_loglik, "cot": _score_cot, "perplexity": _score_perplexity}[p.kind]
    return scorer(p, outputs, cfg)


def _score_loglik(p: Prepared, outputs: list, cfg: EvalConfig) -> Scored:
    per_doc: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    samples = []
    for i, choice_scores in enumerate(outputs):
        logliks = [s[0] for s in choice_scores]
        predictions, target = choice_predictions(logliks, p.choices[i]), p.targets[i]
        correct = {metric: predictions[metric] == target for metric in per_doc}
        for metric, ok in correct.items():
            per_doc[metric].append(float(ok))
        samples.append(
            {
                "task": p.name,
                "doc_id": p.doc_ids[i],
                "context": p.contexts[i],
                "continuations": p.continuations[i],
                "loglik": logliks,
                "is_greedy": [s[1] for s in choice_scores],
                "tokens": [s[2] for s in choice_scores],
                "target": target,
                "target_text": p.choices[i][target],
                "prediction": predictions,
                "correct": correct,
            }
        )
    return Scored(
        summarize(per_doc, iters=cfg.bootstrap_iters, seed=cfg.seed),
        per_doc,
        samples,
        {"acc": True, "acc_norm": True, "acc_bytes": True},
    )


def _score_cot(p: Prepared, outputs: list, cfg: EvalConfig) -> Scored:
    per_doc: dict[str, list[float]] = {"acc": [], "unparsed": []}
    samples = []
    for i, out in enumerate(outputs):
        answers = [extract_answer(text, p.choices[i], p.options[i]) for text in out["completions"]]
        prediction, target = majority_vote(answers), p.targets[i]
        per_doc["acc"].append(float(prediction == target))
        per_doc["unparsed"].append(float(prediction is None))
        samples.append(
            {
                "task": p.name,
                "doc_id": p.doc_ids[i],
                "prompt": out["prompt"],
                "completions": out["completions"],
                "answers": answers,
                "prediction": prediction,
                "target": target,
                "target_text": p.choices[i][target],
                "correct": prediction == target,
            }
        )
    return Scored(
        summarize(per_doc, iters=cfg.bootstrap_iters, seed=cfg.seed), per_doc, samples, {"acc": True, "unparsed": False}
    )


def _score_perplexity(p: Prepared, totals: dict, cfg: EvalConfig) -> Scored:
    metrics = {}
    for metric in PERPLEXITY_METRICS:
        if totals.get(metric) is not None:
            metrics[f"{metric},none"] = totals[metric]
            metrics[f"{metric}_stderr,none"] = NA
    return Scored(metrics, {}, [], {m: False for m in PERPLEXITY_METRICS}, totals)


def _leaf_order(plan: Plan) -> list[str]:
    """Requested names in order, each group followed by its members (lm-eval's table order)."""
    members = {group.group: names for group, names in plan.groups}
    order: list[str] = []
    for name in plan.requested:
        for item in (name, *members.get(name, ())):
            if item not in order:
                order.append(item)
    return order


def results_json(plan: Plan, prepared: list[Prepared], scored: dict[str, Scored], info: dict, cfg: EvalConfig) -> dict:
    """The lm-eval ``results`` layout: results / groups / group_subtasks / configs / versions / n-shot /
    higher_is_better / n-samples / config, plus ``notes`` (e.g. where few-shot demonstrations came from)."""
    tasks = {p.name: p for p in prepared}
    groups = {}
    for group, members in plan.groups:
        groups[group.group] = {
            "alias": group.alias or group.group,
            **summarize_group(
                [scored[m].per_doc for m in members],
                weight_by_size=group.weight_by_size,
                iters=cfg.bootstrap_iters,
                seed=cfg.seed,
            ),
        }
    results = {}
    for name in _leaf_order(plan):
        results[name] = (
            groups[name] if name in groups else {"alias": tasks[name].task.alias or name, **scored[name].metrics}
        )
    group_members = {group.group: members for group, members in plan.groups}
    return {
        "results": results,
        **({"groups": groups} if groups else {}),
        "group_subtasks": {**{name: [] for name in tasks}, **group_members},
        "configs": {name: _task_config(p, cfg, scored[name]) for name, p in tasks.items()},
        "versions": {
            **{name: p.task.version for name, p in tasks.items()},
            **{g.group: g.version for g, _ in plan.groups},
        },
        "n-shot": {
            **{name: p.num_fewshot for name, p in tasks.items()},
            **{g.group: cfg.num_fewshot for g, _ in plan.groups},
        },
        "higher_is_better": {
            **{name: s.higher_is_better for name, s in scored.items()},
            **{g.group: scored[m[0]].higher_is_better for g, m in plan.groups},
        },
        "n-samples": {name: _counts(p, scored[name]) for name, p in tasks.items()},
        "config": {
            **info,
            "batch_size": cfg.batch_size,
            "limit": cfg.limit,
            "bootstrap_iters": cfg.bootstrap_iters,
            "fewshot_seed": cfg.fewshot_seed,
            "random_seed": cfg.seed,
            "prompt_style": cfg.prompt_style,
            "gen_kwargs": cfg.generation.model_dump() if any(p.kind == "cot" for p in prepared) else None,
        },
        "notes": {p.name: p.notes for p in prepared if p.notes},
        "date": time.time(),
    }


def _counts(p: Prepared, s: Scored) -> dict:
    if p.kind == "perplexity":
        return {"original": s.totals["documents"], "effective": s.totals["documents"]}
    return {"original": p.total, "effective": len(p.doc_ids)}


def _task_config(p: Prepared, cfg: EvalConfig, s: Scored) -> dict:
    config = {"task": p.name, "mode": p.kind, "source": p.task.source, "definition": p.task.model_dump(mode="json")}
    if p.kind == "perplexity":
        return {**config, "totals": s.totals}
    return {
        **config,
        "prompt_style": cfg.prompt_style,
        "num_fewshot": p.num_fewshot,
        "fewshot": (
            {"source": p.fewshot_source, "sampler": p.fewshot_sampler, "seed": cfg.fewshot_seed}
            if p.num_fewshot
            else None
        ),
        **({"stop": p.stop} if p.kind == "cot" else {}),
    }


def write_model_outputs(
    out: Path, results: dict, prepared: list[Prepared], scored: dict[str, Scored], name: str
) -> None:
    write_json(out / "results.json", results)
    with atomic_open(out / "samples.jsonl") as fh:
        for p in prepared:
            for sample in scored[p.name].samples:
                fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
    write_text(out / "results.md", model_markdown(name, results))


def _fmt(value) -> str:
    return value if isinstance(value, str) else f"{value:.4f}"


def model_markdown(name: str, results: dict) -> str:
    config = results["config"]
    lines = [
        f"# Evaluation of {name}",
        "",
        f"Model `{config['model_path']}` (files {config['model_files_hash'][:12]}), {config['precision']} on "
        f"{config['device']}, prompt style `{config['prompt_style']}`"
        + (f", first {config['limit']} questions per task" if config["limit"] else "")
        + ". Full results: `results.json`; every question: `samples.jsonl`.",
        "",
        "| Task | Version | n | n-shot | Metric | Value | ± stderr | ± bootstrap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, metrics in results["results"].items():
        depth = "  - " if any(task in members for members in results["group_subtasks"].values()) else ""
        members = results["group_subtasks"].get(task) or [task]
        n = sum(results["n-samples"][m]["effective"] for m in members)
        head = [
            f"{depth}{metrics['alias']}",
            str(results["versions"].get(task, "")),
            str(n),
            str(results["n-shot"].get(task, "")),
        ]
        for key, value in metrics.items():
            metric = key.partition(",")[0]
            if key == "alias" or metric.endswith("_stderr"):
                continue
            boot = metrics.get(f"{metric}_bootstrap_stderr,none")
            cells = [
                *head,
                metric,
                _fmt(value),
                _fmt(metrics[f"{metric}_stderr,none"]),
                _fmt(boot) if boot is not None else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
            head = [""] * len(head)  # the task's other metrics on the rows below
    notes = [f"- {task}: {note}" for task, items in results["notes"].items() for note in items]
    lines += [
        "",
        *(["Notes:", *notes, ""] if notes else []),
        f"{ACC_NOTE} ± stderr is lm-eval's mean_stderr; ± bootstrap resamples the questions "
        f"({config['bootstrap_iters']} times).",
        "",
    ]
    return "\n".join(lines)


def _headline(metrics: dict) -> tuple[str, float] | None:
    """The metric a comparison table shows for a task: accuracy, else a perplexity."""
    for metric in ("acc", *PERPLEXITY_METRICS):
        if isinstance(metrics.get(f"{metric},none"), float):
            return metric, metrics[f"{metric},none"]
    return None


def comparison_rows(plan: Plan, evaluated: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: one row per model, one column per requested task or group,
    then the unweighted average of the accuracy columns."""
    titles = {**{t.task: display_title(t) for t in plan.tasks}, **{g.group: display_title(g) for g, _ in plan.groups}}
    header = ["Model", *(titles[name] for name in plan.requested)]
    rows = []
    for model in evaluated:
        cells, accuracies = [model["name"]], []
        for name in plan.requested:
            metrics = model["results"]["results"][name]
            metric, value = _headline(metrics) or ("", None)
            if value is None:
                cells.append("n/a")
            elif metric == "acc":
                accuracies.append(value)
                stderr = metrics.get("acc_stderr,none")
                cells.append(f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if isinstance(stderr, float) else ""))
            else:
                cells.append(f"{value:.2f} ({metric.replace('_', ' ')})")
        rows.append(cells + ([f"{100 * sum(accuracies) / len(accuracies):.1f}"] if len(accuracies) > 1 else []))
    if any(len(row) > len(header) for row in rows):
        header.append("Avg")
    return header, rows


def write_comparison(path: Path, header: list[str], rows: list[list[str]], models: list[str]) -> None:
    lines = [
        "# Model comparison",
        "",
        "Accuracy in % (± lm-eval's standard error); perplexity columns show the perplexity named. "
        "Groups are size-weighted averages of their tasks; Avg is the plain mean of the accuracy columns.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Per-model details: " + ", ".join(f"[{m}]({m}/results.md)" for m in models), ""]
    write_text(path, "\n".join(lines))
