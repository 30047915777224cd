"""Few-shot demonstrations: where they come from and which ones each question gets.

Demonstrations never come from a test split. A question's demonstrations depend only on the seed,
the task and the question's id, never on batch size, ``limit`` or the order questions are scored
in. When a benchmark has no training data here (MedQA, MedMCQA: only their test sets are shipped,
so their tasks declare no few-shot split), k > 0 is an error unless ``fewshot_source`` names a split
to take demonstrations from: another benchmark's (e.g. ``mmlu_professional_medicine:dev``) or, for
users who are online, the benchmark's own hub train split (``medqa_4options:train``). The results
record where demonstrations came from. No network access is ever attempted implicitly for few-shot.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medfoundry.errors import ConfigError
from medfoundry.eval.data import DataUnavailable, HubLoader, load_split
from medfoundry.eval.fields import Doc
from medfoundry.eval.prompts import PromptBuilder
from medfoundry.eval.tasks import ChoiceTask, Entry


@dataclass
class FewshotPool:
    """The documents demonstrations are drawn from, rendered by their own task's prompt builder."""

    builder: PromptBuilder
    docs: list[Doc]
    source: str  # "task:split"
    note: str | None = None  # set when the demonstrations are borrowed from another benchmark

    def select(self, k: int, *, seed: int, task: str, doc_id: str) -> list[Doc]:
        sampler = self.builder.task.fewshot.sampler
        if sampler == "first_n":
            return self.docs[:k]
        key = f"{seed}:{task}:{self.source}" + ("" if sampler == "fixed" else f":{doc_id}")
        return random.Random(key).sample(self.docs, k)

    def demonstrations(self, k: int, *, seed: int, task: str, doc_id: str) -> list[str]:
        return [self.builder.demonstration(doc) for doc in self.select(k, seed=seed, task=task, doc_id=doc_id)]


def fewshot_pool(
    task: ChoiceTask,
    k: int,
    *,
    style: str,
    source: str | None,
    get_task: Callable[[str], Entry],
    benchmarks_dir: Path,
    hub_loader: HubLoader | None = None,
) -> FewshotPool | None:
    """The pool for ``k``-shot prompts of ``task``; None for zero-shot."""
    if k == 0:
        return None
    reason = task.fewshot.note or f"task {task.task} defines no few-shot split"
    if task.fewshot.split is not None:
        try:
            docs = load_split(task, task.fewshot.split, benchmarks_dir, hub_loader)
            return _checked(FewshotPool(PromptBuilder(task, style), docs, f"{task.task}:{task.fewshot.split}"), k)
        except DataUnavailable as exc:
            reason = task.fewshot.note or str(exc)
    if source is None:
        raise ConfigError(
            f"task {task.task}: {k}-shot prompts need demonstrations, but {reason}. Set "
            "fewshot_source=TASK[:SPLIT] to borrow another benchmark's train or dev split (e.g. "
            "mmlu_professional_medicine:dev; the results will say so), or use num_fewshot=0"
        )
    return _borrowed(task, k, style, source, reason, get_task, benchmarks_dir, hub_loader)


def _borrowed(
    task: ChoiceTask, k: int, style: str, source: str, reason: str, get_task, benchmarks_dir: Path, hub_loader
) -> FewshotPool:
    name, _, split = source.partition(":")
    lender = get_task(name)
    if not isinstance(lender, ChoiceTask):
        raise ConfigError(f"fewshot_source {source!r}: {name} is not a multiple-choice task")
    split = split or lender.fewshot.split
    if not split:
        raise ConfigError(f"fewshot_source {source!r}: {name} has no few-shot split; name one, e.g. {name}:dev")
    if split == lender.test_split:
        raise ConfigError(
            f"fewshot_source {source!r}: that is {name}'s test split; demonstrations never come from a test set"
        )
    docs = load_split(lender, split, benchmarks_dir, hub_loader)
    note = f"{k}-shot demonstrations from {name}:{split}" + (
        "" if name == task.task else f", not {task.task}'s own ({reason})"
    )
    return _checked(FewshotPool(PromptBuilder(lender, style), docs, f"{name}:{split}", note), k)


def _checked(pool: FewshotPool, k: int) -> FewshotPool:
    if len(pool.docs) < k:
        raise ConfigError(f"{k}-shot prompts need {k} demonstrations but {pool.source} has only {len(pool.docs)}")
    return pool
