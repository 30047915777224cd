"""Few-shot demonstrations: where they come from and which ones each question gets.

Demonstrations never come from a test split. Which ones a question gets is its task's ``fewshot.sampler``:

* ``lm_eval`` (the default): lm-eval 0.4.13's ``ContextSampler``. One ``random.Random(fewshot_seed)`` per
  task (lm-eval's ``set_fewshot_seed``; 1234 is lm-eval's default) is consumed in document order, one
  ``rnd.sample(pool, k)`` per question, as ``build_all_requests`` builds contexts (rank 0 of 1, first
  ``limit`` documents). A question's demonstrations therefore depend on the seed and its position in the
  test split: never on batch size or ``limit`` (a shorter run is a prefix of a longer one), but they are
  not those of the same question in a run over different documents. With the same pool in the same order
  (PubMedQA: fold 0's train set, see :func:`medfoundry.eval.data.pqal_split`) the draws are lm-eval's.
* ``per_question`` (medfoundry's own, not lm-eval's): each question draws from its own
  ``Random(f"{seed}:{task}:{pool}:{question id}")``, so its demonstrations depend only on the seed, the
  task, the pool and the question's id, whatever else is evaluated.
* ``first_n``: the first k of the pool in file order (lm-eval's MMLU ``first_n``); ``fixed``: one draw of
  k for every question (Meditron).

When a benchmark has no training data here (MedQA, MedMCQA: only their test sets are shipped, so
their tasks declare no few-shot split), k > 0 is an error unless ``fewshot_source`` names a split to
take demonstrations from: another benchmark's (e.g. ``mmlu_professional_medicine:dev``) or, for users
who are online, the benchmark's own hub train split (``medqa_4options:train``). Borrowed demonstrations
are drawn by the lender's sampler. A run's ``fewshot_sampler`` replaces the task's (or the lender's)
sampler. The results record where demonstrations came from and how they were drawn, and a note says
when the sampler is not lm-eval's. No network access is ever attempted implicitly for few-shot.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medfoundry.errors import ConfigError
from medfoundry.eval.data import DataUnavailable, HubLoader, load_split
from medfoundry.eval.fields import Doc
from medfoundry.eval.prompts import PromptBuilder
from medfoundry.eval.tasks import ChoiceTask, Entry

LM_EVAL_SAMPLERS = ("lm_eval", "first_n")


def lm_eval_sample(rnd: random.Random, pool: list[Doc], n: int, eval_doc: Doc | None = None) -> list[Doc]:
    """lm-eval 0.4.13's ``ContextSampler.sample``, draw for draw: ``rnd.sample(pool, n)``; when the pool is the
    evaluated split (``eval_doc`` given) ``n + 1`` are drawn and the evaluated document removed (by content,
    as lm-eval compares records), with a fresh draw from the pool without it if duplicates left fewer than n."""
    if n == 0:
        return []
    if eval_doc is None:
        return rnd.sample(pool, n)
    drawn = [doc for doc in rnd.sample(pool, n + 1) if doc.fields != eval_doc.fields][:n]
    if len(drawn) < n:
        drawn = rnd.sample([doc for doc in pool if doc.fields != eval_doc.fields], n)
    return drawn


@dataclass
class FewshotPool:
    """The documents demonstrations are drawn from, rendered by their own task's prompt builder.

    With the ``lm_eval`` sampler the pool keeps one generator per seed, consumed by each call: call
    :meth:`select` once per evaluated document, in document order (as :func:`medfoundry.eval.run.prepare`
    does), for lm-eval's draws."""

    builder: PromptBuilder
    docs: list[Doc]
    source: str  # "task:split"
    sampler: str  # FewshotSpec.sampler's values
    note: str | None = None  # set when the demonstrations are borrowed from another benchmark
    _streams: dict[int, random.Random] = field(default_factory=dict, repr=False)

    def select(self, k: int, *, seed: int, task: str, doc_id: str) -> list[Doc]:
        sampler = self.sampler
        if sampler == "first_n":
            return self.docs[:k]
        if sampler == "lm_eval":
            if seed not in self._streams:
                self._streams[seed] = random.Random(seed)
            return lm_eval_sample(self._streams[seed], self.docs, k)
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
    sampler: str | None = None,
) -> FewshotPool | None:
    """The pool for ``k``-shot prompts of ``task``; None for zero-shot. ``sampler`` (the run's
    ``fewshot_sampler``) replaces the sampler of the task that lends the demonstrations."""
    if k == 0:
        return None
    reason = task.fewshot.note or f"task {task.task} defines no few-shot split"
    if task.fewshot.split is not None:
        try:
            docs = load_split(task, task.fewshot.split, benchmarks_dir, hub_loader)
            source = f"{task.task}:{task.fewshot.split}"
            return _checked(FewshotPool(PromptBuilder(task, style), docs, source, sampler or task.fewshot.sampler), k)
        except DataUnavailable as exc:
            reason = task.fewshot.note or str(exc)
    if source is None:
        raise ConfigError(
            f"task {task.task}: {k}-shot prompts need demonstrations, but {reason}. Set "
            "fewshot_source=TASK[:SPLIT] to borrow another benchmark's train or dev split (e.g. "
            "mmlu_professional_medicine:dev; the results will say so), or use num_fewshot=0"
        )
    return _borrowed(task, k, style, source, reason, get_task, benchmarks_dir, hub_loader, sampler)


def _borrowed(
    task: ChoiceTask,
    k: int,
    style: str,
    source: str,
    reason: str,
    get_task,
    benchmarks_dir: Path,
    hub_loader,
    sampler: str | None,
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
    pool = FewshotPool(PromptBuilder(lender, style), docs, f"{name}:{split}", sampler or lender.fewshot.sampler, note)
    return _checked(pool, k)


def _checked(pool: FewshotPool, k: int) -> FewshotPool:
    if len(pool.docs) < k:
        raise ConfigError(f"{k}-shot prompts need {k} demonstrations but {pool.source} has only {len(pool.docs)}")
    if pool.sampler not in LM_EVAL_SAMPLERS:
        what = (
            "the same demonstrations for every question"
            if pool.sampler == "fixed"
            else "demonstrations drawn per question by (seed, task, question id)"
        )
        own = f"{what} (fewshot.sampler {pool.sampler}), not lm-eval's draws"
        pool.note = f"{pool.note}; {own}" if pool.note else own
    return pool
