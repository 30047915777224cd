"""The card's YAML front matter, written with ``huggingface_hub``'s own serializer so that its
``model-index`` has exactly the shape the Hub reads (one result per evaluated task and metric)."""

from __future__ import annotations

import math

from medfoundry.card.artifacts import Run

# results.json metric -> (model-index metric type, metric name), by scoring mode
METRICS = {
    "loglik": [("acc", "acc", "accuracy"), ("acc_norm", "acc_norm", "normalized accuracy")],
    "cot": [("acc", "acc", "accuracy")],
    "perplexity": [("word_perplexity", "perplexity", "word perplexity")],
}
TASK_TYPES = {
    "loglik": ("multiple-choice", "Multiple Choice"),
    "cot": ("multiple-choice", "Multiple Choice"),
    "perplexity": ("text-generation", "Text Generation"),
}
METRIC_IDS = {"acc": "accuracy", "acc_norm": "accuracy", "perplexity": "perplexity"}


def front_matter(run: Run) -> str:
    from huggingface_hub import ModelCardData

    results = eval_results(run)
    data = ModelCardData(
        model_name=run.name,
        license=run.card.license,
        language=languages(run),
        datasets=run.card.datasets or None,
        base_model=run.card.base_model,
        tags=["medical", "biomedical", "medfoundry", *run.card.tags],
        pipeline_tag="text-generation",
        library_name="transformers",
        metrics=sorted({METRIC_IDS[r.metric_type] for r in results}) or None,
        eval_results=results or None,
        widget=[{"text": s["prompt"]} for s in run.samples or []] or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def languages(run: Run) -> list[str]:
    """The card section's languages, else the corpus's language filter, else English (every source and
    benchmark medfoundry reads is English)."""
    if run.card.language:
        return run.card.language
    corpus_language = (run.corpus.config.get("clean") or {}).get("language") if run.corpus is not None else None
    return [corpus_language] if corpus_language else ["en"]


def task_mode(results: dict, name: str) -> str:
    """loglik, cot or perplexity; a group's is its first member's."""
    configs = results["configs"]
    return configs[name]["mode"] if name in configs else configs[results["group_subtasks"][name][0]]["mode"]


def task_title(results: dict, name: str) -> str:
    if name in results["configs"]:
        definition = results["configs"][name]["definition"]
        return definition.get("title") or definition.get("alias") or name
    return group_title(name, results["results"][name].get("alias") or name)


def group_title(name: str, fallback: str) -> str:
    """A built-in group's title (e.g. MMLU-medical); a group defined elsewhere keeps its alias."""
    from medfoundry.errors import ConfigError
    from medfoundry.eval.tasks import BUILTIN_DIR, TaskRegistry, display_title

    try:
        return display_title(TaskRegistry([BUILTIN_DIR]).get(name))
    except ConfigError:
        return fallback


def dataset(results: dict, name: str) -> dict:
    """model-index ``dataset`` fields: the Hub dataset the task's local files come from, when it has one."""
    member = name if name in results["configs"] else results["group_subtasks"][name][0]
    definition = results["configs"][member]["definition"]
    hub = definition.get("hub")
    fields = {
        "dataset_name": task_title(results, name),
        "dataset_type": hub["path"] if hub else name,
        "dataset_args": {"num_few_shot": results["n-shot"].get(name, 0)},
    }
    if hub:
        split = hub["splits"].get(definition.get("test_split", "test"))
        fields.update({"dataset_split": split} if split else {})
        fields.update({"dataset_config": hub["name"]} if hub.get("name") and member == name else {})
    return fields


def eval_results(run: Run) -> list:
    """One ``EvalResult`` per task (groups included) and metric of the run's model; non-finite values left out."""
    from huggingface_hub import EvalResult

    results = run.model_results()
    if results is None:
        return []
    out = []
    for name, metrics in results["results"].items():
        mode = task_mode(results, name)
        task_type, task_name = TASK_TYPES[mode]
        for key, metric_type, metric_name in METRICS[mode]:
            value = metrics.get(f"{key},none")
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=task_name,
                        metric_type=metric_type,
                        metric_name=metric_name,
                        metric_value=value,
                        verified=False,
                        **dataset(results, name),
                    )
                )
    return out
