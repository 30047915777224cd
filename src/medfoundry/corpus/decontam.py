"""Decontamination: find corpus documents that contain evaluation items.

The index holds the word n-gram hashes of every test item of the selected benchmarks in one sorted
uint64 array, with a parallel array naming the item each hash came from, so checking a document is
two ``np.searchsorted`` calls. The number of distinct n-grams of every item is counted once, when the
index is built: a match is attributed to the item with the highest *fraction* of its n-grams found in
the document (all 15 of a short MedMCQA item rank above 40 of a 300-n-gram MedQA vignette), and
reports that fraction. Text on both sides is split into NFKC-normalized, lower-cased
words by :mod:`medfoundry.corpus.ngrams`, so case, punctuation and spacing differences do not hide
an overlap. PubMedQA test abstracts are also caught by PMID when the document carries one.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.corpus.ngrams import ngram_hashes, word_hashes
from medfoundry.errors import InputError, MedfoundryError

BENCHMARKS = ("pubmedqa", "medqa", "medmcqa", "mmlu")

Item = tuple[str, str, str]  # (benchmark, item id, text)


@dataclass(frozen=True)
class Contamination:
    """Why a document was removed. ``reason`` is ``pubmedqa_test_pmid`` or ``ngram_overlap``."""

    reason: str
    benchmark: str
    item: str
    matches: int  # distinct n-grams of ``item`` found in the text (0 for a PMID match)
    detail: str
    item_ngrams: int = 0  # distinct n-grams of ``item`` (0 for a PMID match)

    @property
    def fraction(self) -> float:
        """Share of the item's n-grams found in the text: what items are ranked by (1.0 for a PMID match)."""
        return self.matches / self.item_ngrams if self.item_ngrams else 1.0


def _missing(path: Path | str, benchmark: str) -> MedfoundryError:
    return MedfoundryError(
        f"decontam.benchmarks_dir: {path} is missing (needed for the {benchmark!r} benchmark). "
        "Point decontam.benchmarks_dir at a folder laid out like shared/data/benchmarks, "
        f"or drop {benchmark!r} from decontam.sets."
    )


def _require(path: Path, benchmark: str) -> Path:
    if not path.exists():
        raise _missing(path, benchmark)
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(path, f"invalid JSON: {err.msg}", err.lineno) from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(path, f"invalid JSON: {err.msg}", lineno) from None


def _field(record: Any, name: str, path: Path, line: int | None = None, item: str = "") -> Any:
    """``record[name]``, or an InputError naming the file, the line or ``item``, and the field."""
    if not isinstance(record, dict) or name not in record:
        raise InputError(path, f"{item}missing field {name!r}", line)
    return record[name]


def _pubmedqa_test_pmids(root: Path) -> list[str]:
    return list(_read_json(_require(root / "pubmedqa" / "test_ground_truth.json", "pubmedqa")))


def _pubmedqa_items(root: Path) -> Iterator[Item]:
    """The 500 test questions only: the other 500 of PQA-L are its train/dev split."""
    path = _require(root / "pubmedqa" / "ori_pqal.json", "pubmedqa")
    records = _read_json(path)
    for pmid in _pubmedqa_test_pmids(root):
        if pmid not in records:
            raise InputError(path, f"test PMID {pmid} (from test_ground_truth.json) is missing")
        question, contexts = (_field(records[pmid], k, path, item=f"PMID {pmid}: ") for k in ("QUESTION", "CONTEXTS"))
        yield "pubmedqa", pmid, question + "\n" + "\n".join(contexts)


def _medqa_items(root: Path) -> Iterator[Item]:
    """The 4- and 5-option files hold the same questions in the same order: one item per line number."""
    for name in ("us_4_options_test.jsonl", "us_5_options_test.jsonl"):
        path = _require(root / "medqa" / name, "medqa")
        for i, (line, record) in enumerate(_read_jsonl(path)):
            question, options = (_field(record, k, path, line) for k in ("question", "options"))
            yield "medqa", str(i), "\n".join([question, *options.values()])


def _medmcqa_items(root: Path) -> Iterator[Item]:
    path = _require(root / "medmcqa" / "dev.jsonl", "medmcqa")
    for line, record in _read_jsonl(path):
        item_id, *parts = (_field(record, k, path, line) for k in ("id", "question", "opa", "opb", "opc", "opd"))
        yield "medmcqa", item_id, "\n".join(part or "" for part in parts)


def _mmlu_items(root: Path) -> Iterator[Item]:
    """Header-less ``question,A,B,C,D,answer`` rows; item id is ``subject:row``."""
    files = sorted((root / "mmlu" / "test").glob("*.csv"))
    if not files:
        raise _missing(root / "mmlu" / "test" / "*.csv", "mmlu")
    for path in files:
        subject = path.stem.removesuffix("_test")
        with path.open(encoding="utf-8", newline="") as f:
            rows = csv.reader(f)
            for i, row in enumerate(rows):
                if len(row) < 6:
                    message = f"expected 6 columns (question,A,B,C,D,answer), found {len(row)}"
                    raise InputError(path, message, rows.line_num)
                yield "mmlu", f"{subject}:{i}", "\n".join(row[:5])


_LOADERS = {"pubmedqa": _pubmedqa_items, "medqa": _medqa_items, "medmcqa": _medmcqa_items, "mmlu": _mmlu_items}


@dataclass(eq=False)
class BenchmarkIndex:
    """N-gram table of benchmark test items, plus the PubMedQA test PMIDs. Plain arrays: pickles fast."""

    ngram: int
    pmids: frozenset[str]
    keys: np.ndarray  # sorted uint64 n-gram hashes; a hash shared by k items appears k times
    owners: np.ndarray  # int32, keys[i] comes from items[owners[i]]
    items: list[tuple[str, str]]  # (benchmark, item id)
    item_ngrams: np.ndarray  # int64, distinct n-grams of items[i]: the denominators of the fractions
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # per benchmark: items, ngrams, short_items

    @classmethod
    def build(cls, benchmarks_dir: Path, sets: list[str], ngram: int, pubmedqa_ids: bool) -> BenchmarkIndex:
        """Index the test items of ``sets``. Items shorter than ``ngram`` words cannot be matched and
        are counted as ``short_items``. PMIDs are indexed when ``pubmedqa_ids`` and pubmedqa is in ``sets``."""
        root = Path(benchmarks_dir)
        if not root.is_dir():
            raise MedfoundryError(f"decontam.benchmarks_dir: {root} is not a folder")
        unknown = sorted(set(sets) - set(BENCHMARKS))
        if unknown:
            raise MedfoundryError(f"decontam.sets: unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")

        grams_of: dict[tuple[str, str], list[np.ndarray]] = {}
        for name in dict.fromkeys(sets):
            for benchmark, item_id, text in _LOADERS[name](root):
                grams_of.setdefault((benchmark, item_id), []).append(ngram_hashes(word_hashes(text), ngram))

        items = list(grams_of)
        stats = {name: {"items": 0, "ngrams": 0, "short_items": 0} for name in dict.fromkeys(sets)}
        per_item = []
        for (benchmark, _), parts in grams_of.items():
            grams = np.unique(np.concatenate(parts))
            per_item.append(grams)
            stats[benchmark]["items"] += 1
            stats[benchmark]["ngrams"] += len(grams)
            stats[benchmark]["short_items"] += not len(grams)

        keys = np.concatenate(per_item) if per_item else np.empty(0, np.uint64)
        owners = np.repeat(np.arange(len(items), dtype=np.int32), [len(g) for g in per_item])
        order = np.argsort(keys, kind="stable")
        pmids = frozenset(_pubmedqa_test_pmids(root)) if pubmedqa_ids and "pubmedqa" in sets else frozenset()
        item_ngrams = np.array([len(g) for g in per_item], dtype=np.int64)
        return cls(ngram, pmids, keys[order], owners[order], items, item_ngrams, stats)

    def match(self, text: str, pmid: str | None = None, min_matches: int = 1) -> Contamination | None:
        """The reason ``text`` is contaminated, or None. A PMID match wins; otherwise the document is
        contaminated when at least ``min_matches`` of its distinct n-grams occur in benchmark items (in
        any items, all together), and is attributed to the item with the highest fraction of its own
        distinct n-grams found in the text (ties: the item sharing more n-grams, then the first indexed)."""
        return self.match_words(word_hashes(text), pmid, min_matches)

    def match_words(self, words: np.ndarray, pmid: str | None = None, min_matches: int = 1) -> Contamination | None:
        """:meth:`match` on the text's :func:`~medfoundry.corpus.ngrams.word_hashes`, when the caller has them."""
        if pmid is not None and str(pmid).strip() in self.pmids:
            return Contamination(
                "pubmedqa_test_pmid", "pubmedqa", str(pmid).strip(), 0, f"PMID {pmid} is a PubMedQA test question"
            )
        grams = ngram_hashes(words, self.ngram)
        if not len(grams) or not len(self.keys):
            return None
        nearest = self.keys[np.minimum(np.searchsorted(self.keys, grams), len(self.keys) - 1)]
        shared = np.unique(grams[nearest == grams])  # distinct n-grams found in some item
        if len(shared) == 0 or len(shared) < min_matches:
            return None
        item, found = self._best_item(shared)
        benchmark, item_id = self.items[item]
        total = int(self.item_ngrams[item])
        return Contamination(
            "ngram_overlap",
            benchmark,
            item_id,
            found,
            f"{found} of the {total} {self.ngram}-grams of {benchmark} item {item_id} ({found / total:.0%}; "
            f"the text has {len(np.unique(grams))}, {len(shared)} of them in benchmarks)",
            total,
        )

    def _best_item(self, shared: np.ndarray) -> tuple[int, int]:
        """(item, its n-grams among ``shared``) for the item with the highest fraction of its n-grams in
        ``shared`` (distinct hashes, all in the index). Every row of ``keys`` equal to one of them is
        gathered at once (a hash shared by k items has k rows); an item's hashes are distinct, so its row
        count is the number of its n-grams found."""
        lo = np.searchsorted(self.keys, shared, side="left")
        length = np.searchsorted(self.keys, shared, side="right") - lo
        rows = np.arange(length.sum()) + np.repeat(lo - np.cumsum(length) + length, length)
        candidates, counts = np.unique(self.owners[rows], return_counts=True)
        fractions = counts / self.item_ngrams[candidates]
        best = np.lexsort((candidates, -counts, -fractions))[0]  # last key first: fraction, count, index
        return int(candidates[best]), int(counts[best])

    def summary(self) -> dict:
        """Manifest entry: what the index covers."""
        return {
            "ngram": self.ngram,
            "pubmedqa_test_pmids": len(self.pmids),
            "benchmarks": {name: dict(s) for name, s in self.stats.items()},
        }
