"""Refuse training records that contain evaluation test items (PubMedQA, MedQA, MedMCQA, MMLU).

Three checks, from the most to the least certain:

* the record is a PubMedQA test article (its PMID is in ``test_ground_truth.json``);
* it holds a multiple-choice test item verbatim: same question and options after normalization
  (NFKC, lower case, words only), which catches the items too short for any 13-gram (a third of
  MedMCQA's questions with their options are under 13 words);
* its text covers at least ``min_fraction`` of a test item's word 13-grams, through the corpus
  decontamination index (:class:`~medfoundry.corpus.decontam.BenchmarkIndex`). A fraction of the
  item, rather than any single shared 13-gram, because exam vignettes share stock openings ("a
  45-year-old man comes to the emergency department because of ...") that are not the item.
  Precisely: for every test item, the number of its distinct 13-grams found among the record's
  13-grams divided by its number of distinct 13-grams (counted once per index); the item with the
  highest fraction is the one checked, and the record is refused when that fraction is at least
  ``min_fraction``, i.e. when any item is covered that much. Ranking by the fraction, not by the
  count of shared 13-grams, is what catches a record holding all 15 13-grams of a short MedMCQA
  item beside 40 of the 300 of a long MedQA vignette (the vignette shares more, but only 13% of it).

The test splits are read with this package's own converters, so the exact-match keys of a test item
and of the same item converted for training are built the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from medfoundry.corpus.decontam import BenchmarkIndex
from medfoundry.corpus.ngrams import words
from medfoundry.errors import MedfoundryError
from medfoundry.sft import converters
from medfoundry.sft.formats import Conversation

SHOWN = 5


@dataclass(frozen=True)
class Overlap:
    """Why a record was refused: ``reason`` is ``pubmedqa_test_pmid``, ``same_item`` or ``ngram_overlap``."""

    location: str
    benchmark: str
    item: str
    reason: str
    detail: str


def item_key(question: str, options: Iterable[str]) -> int:
    """Hash of the normalized words of a question followed by its options."""
    return xxhash.xxh64_intdigest(" ".join(words("\n".join([question, *options]))).encode())


def _test_items(root: Path, sets: list[str]) -> Iterator[tuple[str, Conversation]]:
    """The multiple-choice test items, read with the training converters."""
    if "medqa" in sets:
        for name in ("us_4_options_test.jsonl", "us_5_options_test.jsonl"):
            yield from (("medqa", c) for c in converters.medqa(root / "medqa" / name))
    if "medmcqa" in sets:
        yield from (("medmcqa", c) for c in converters.medmcqa(root / "medmcqa" / "dev.jsonl"))
    if "mmlu" in sets:
        yield from (("mmlu", c) for c in converters.mmlu(root / "mmlu" / "test"))


def _question_keys(conversation: Conversation) -> list[int]:
    return [item_key(m.content, m.options.values()) for m in conversation.messages if m.options]


def check_text(conversation: Conversation) -> str:
    """The text matched against test n-grams: every turn, options after their question as in the index."""
    return "\n".join("\n".join([m.content, *(m.options or {}).values()]) for m in conversation.messages)


class OverlapGuard:
    """Index of the test splits of ``sets`` under ``benchmarks_dir`` (laid out like shared/data/benchmarks)."""

    def __init__(self, benchmarks_dir: str | Path, sets: list[str], *, ngram: int = 13, min_fraction: float = 0.5):
        root = Path(benchmarks_dir)
        self.index = BenchmarkIndex.build(root, sets, ngram, pubmedqa_ids=True)
        self.min_fraction = min_fraction
        self.keys: dict[int, tuple[str, str]] = {}
        for benchmark, item in _test_items(root, sets):
            for key in _question_keys(item):
                self.keys.setdefault(key, (benchmark, item.location))

    def check(self, conversation: Conversation) -> Overlap | None:
        """Why ``conversation`` overlaps a test item, or None."""
        where = conversation.location
        for key in _question_keys(conversation):
            if key in self.keys:
                benchmark, item = self.keys[key]
                return Overlap(where, benchmark, item, "same_item", f"same question and options as {item}")
        found = self.index.match(check_text(conversation), conversation.pmid)
        if found is None:
            return None
        if found.reason != "ngram_overlap":
            return Overlap(where, found.benchmark, found.item, found.reason, found.detail)
        if found.matches < self.min_fraction * found.item_ngrams:  # the best-covered item is not covered enough
            return None
        detail = f"{found.matches} of the item's {found.item_ngrams} {self.index.ngram}-grams ({found.fraction:.0%})"
        return Overlap(where, found.benchmark, found.item, "ngram_overlap", detail)

    def summary(self) -> dict:
        return {**self.index.summary(), "exact_items": len(self.keys), "min_fraction": self.min_fraction}


def overlap_error(found: list[Overlap], checked: int) -> MedfoundryError:
    """The refusal: how many records, per benchmark, and the first few with their location and item."""
    per_benchmark: dict[str, int] = {}
    for o in found:
        per_benchmark[o.benchmark] = per_benchmark.get(o.benchmark, 0) + 1
    counts = ", ".join(f"{b}: {n}" for b, n in sorted(per_benchmark.items()))
    lines = [f"{len(found)} of {checked} training records overlap evaluation test splits ({counts}):"]
    lines += [f"  {o.location}: {o.benchmark} test item {o.item} ({o.reason}: {o.detail})" for o in found[:SHOWN]]
    if len(found) > SHOWN:
        lines.append(f"  ... and {len(found) - SHOWN} more")
    lines.append(
        "Training on them would inflate the evaluation. Remove them from the sources, or set "
        "allow_test_overlap: true to train on them anyway (the manifest then records the overlap)."
    )
    return MedfoundryError("\n".join(lines))
