"""Deterministic mixture sampling and the train/validation split.

Weights are target shares of the train split's characters. Sources without a weight are taken
whole (each document once) and the weighted ones are sized around them, which is how GAP-Replay
adds ~1% general text to a medical corpus; a weighted source that would need more than
``max_repeat`` copies is capped and reported as falling short. When every source is weighted, the
train split is the smallest that uses every document at least once, shrunk if needed so that no
source repeats more than ``max_repeat`` times (larger sources are then downsampled and the shares
stay exact); ``total_chars`` fixes its size instead.

A source's factor ``f = k + r`` becomes k copies of every document plus a fraction r chosen in
the order of a seeded hash of the document id, stopping at the character budget: the same
seed always selects the same documents, and the achieved share is exact to within one document.
The selection streams (see :class:`Selection`): a histogram of characters over hash bins finds the
bin where the budget runs out, and only that bin's documents are sorted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from medfoundry.corpus.config import CorpusConfig
from medfoundry.errors import MedfoundryError
from medfoundry.io import atomic_open, atomic_path


def unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from a seed and a string, stable across runs and machines."""
    return xxhash.xxh64_intdigest(key.encode(), seed=seed) / 2**64


def in_validation(doc_id: str, cfg: CorpusConfig) -> bool:
    return unit_hash(cfg.split.seed, doc_id) < cfg.split.val_fraction


@dataclass
class SourcePlan:
    source: str
    weight: float | None
    available_chars: int
    factor: float
    capped: bool  # the weight needs more than max_repeat copies: the achieved share falls short


def plan_factors(cfg: CorpusConfig, available: dict[str, int]) -> dict[str, SourcePlan]:
    weights = {s.name: s.weight for s in cfg.sources}
    empty = [n for n, w in weights.items() if w is not None and available.get(n, 0) == 0]
    if empty:
        raise MedfoundryError(
            f"sources {empty} have a weight but no documents left after filtering and dedup; "
            "remove their weight or check their inputs in the report"
        )
    weighted = {n: w for n, w in weights.items() if w is not None}
    anchors = [n for n, w in weights.items() if w is None]
    if anchors:
        total = sum(available.get(n, 0) for n in anchors) / (1 - sum(weighted.values()))
    elif cfg.mix.total_chars:
        total = float(cfg.mix.total_chars)
    else:
        total = max(available[n] / w for n, w in weighted.items())
        total = min([total] + [available[n] * cfg.mix.max_repeat / w for n, w in weighted.items()])
    plans = {}
    for name, weight in weights.items():
        chars = available.get(name, 0)
        wanted = 1.0 if weight is None else weight * total / chars
        plans[name] = SourcePlan(name, weight, chars, min(wanted, cfg.mix.max_repeat), wanted > cfg.mix.max_repeat)
    return plans


BINS = 1 << 16  # histogram bins over the hash order: the fractional cut is found without sorting a source


def hash_bins(hashes: np.ndarray) -> np.ndarray:
    """Bin of each :func:`unit_hash` value; exact (a power of two), so bins follow the hash order."""
    return (hashes * BINS).astype(np.int64)


@dataclass
class Selection:
    """Copies of one source's documents in one split, for a factor ``f = whole + r``: ``whole`` copies of
    each, plus one for the documents first in the order of a seeded hash of their id until the
    characters taken reach ``r`` times the group's, stopping at the first document that would overshoot
    by more than half its size. Documents in bins before ``cut_bin`` are all taken, ``cut_rows`` are
    those taken in ``cut_bin`` (-1: no fraction)."""

    whole: int
    cut_bin: int = -1
    cut_rows: frozenset[int] = frozenset()

    def copies(self, hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        copies = np.full(len(rows), self.whole, dtype=np.int64)
        if self.cut_bin >= 0:
            bins = hash_bins(hashes)
            copies += (bins < self.cut_bin) | np.isin(rows, list(self.cut_rows))
        return copies


def cut_bin(factor: float, histogram: np.ndarray) -> tuple[int, float, float]:
    """``(bin, characters taken before it, budget)`` for a group whose characters per hash bin are
    ``histogram``: every document in an earlier bin fits the budget, none after it does."""
    budget = (factor - math.floor(factor)) * float(histogram.sum())
    if budget <= 0:
        return -1, 0.0, 0.0
    cumulative = np.cumsum(histogram)
    b = int(np.searchsorted(cumulative, budget, side="right"))
    return b, float(cumulative[b - 1]) if b else 0.0, budget


def take_in_bin(taken: float, budget: float, hashes: np.ndarray, rows: np.ndarray, chars: np.ndarray) -> frozenset:
    """Rows taken in the cut bin: in hash order (ties by row), until one would overshoot."""
    chosen = []
    for i in np.lexsort((rows, hashes)).tolist():
        if taken + chars[i] / 2 > budget:
            break
        chosen.append(int(rows[i]))
        taken += float(chars[i])
    return frozenset(chosen)


def assign_copies(
    cfg: CorpusConfig, sources: list[str], extract_dir: Path, offsets: np.ndarray, alive: np.ndarray, mix_dir: Path
) -> tuple[dict[str, SourcePlan], dict[str, int]]:
    """Copies of every living document, streamed one extract task at a time: ``mix_dir/{task}.npz`` holds
    each row's ``copies`` and ``val`` flag, ``mix_dir/dropped.jsonl.gz`` the documents the sampler left
    out. Factors come from the train split; validation takes each source's factor capped at 1 (a
    held-out document is never repeated), so it has the train split's composition. Returns the plans and
    the number of document copies per split."""
    histograms: dict[tuple[str, str], np.ndarray] = {}
    for task, source in enumerate(sources):  # hashes, split and characters per hash bin
        ids, chars = _task_columns(extract_dir, task)
        hashes = np.array([unit_hash(cfg.mix.seed, i) for i in ids], dtype=np.float64)
        val = np.array([in_validation(i, cfg) for i in ids], dtype=bool)
        _save(mix_dir / f"{task:05d}.npz", hashes=hashes, val=val, chars=chars)
        for split, mask in _splits(alive[offsets[task] : offsets[task + 1]], val):
            histogram = histograms.setdefault((source, split), np.zeros(BINS))
            histogram += np.bincount(hash_bins(hashes[mask]), weights=chars[mask], minlength=BINS)
    available = {s.name: int(histograms.get((s.name, "train"), np.zeros(1)).sum()) for s in cfg.sources}
    plans = plan_factors(cfg, available)
    selections = _selections(cfg, plans, histograms, sources, offsets, alive, mix_dir)
    sizes = {"train": 0, "val": 0}
    with atomic_open(mix_dir / "dropped.jsonl.gz", compresslevel=1) as dropped:
        for task, source in enumerate(sources):
            with np.load(mix_dir / f"{task:05d}.npz") as data:
                hashes, val = data["hashes"], data["val"]
            live = alive[offsets[task] : offsets[task + 1]]
            rows = np.arange(offsets[task], offsets[task + 1])
            copies = np.zeros(len(rows), dtype=np.int64)
            for split, mask in _splits(live, val):
                copies[mask] = selections[source, split].copies(hashes[mask], rows[mask])
                sizes[split] += int(copies[mask].sum())
            _save(mix_dir / f"{task:05d}.npz", copies=copies, val=val)
            _write_unselected(dropped, extract_dir, task, source, np.flatnonzero(live & (copies == 0)))
    return plans, sizes


def _splits(live: np.ndarray, val: np.ndarray):
    return (("train", live & ~val), ("val", live & val))


def _selections(cfg, plans, histograms, sources, offsets, alive, mix_dir) -> dict:
    """A :class:`Selection` per (source, split); a second pass reads the documents of each cut bin."""
    cuts, selections = {}, {}
    for (source, split), histogram in histograms.items():
        factor = plans[source].factor if split == "train" else min(plans[source].factor, 1.0)
        cuts[source, split] = (*cut_bin(factor, histogram), math.floor(factor))
    candidates: dict[tuple[str, str], list] = {group: [] for group, cut in cuts.items() if cut[0] >= 0}
    for task, source in enumerate(sources):
        if (source, "train") not in candidates and (source, "val") not in candidates:
            continue
        with np.load(mix_dir / f"{task:05d}.npz") as data:
            hashes, val, chars = data["hashes"], data["val"], data["chars"]
        for split, mask in _splits(alive[offsets[task] : offsets[task + 1]], val):
            if (source, split) in candidates:
                hit = np.flatnonzero(mask & (hash_bins(hashes) == cuts[source, split][0]))
                candidates[source, split].append((hashes[hit], hit + offsets[task], chars[hit]))
    for group, (b, taken, budget, whole) in cuts.items():
        if b < 0:
            selections[group] = Selection(whole)
            continue
        hashes, rows, chars = (np.concatenate(c) for c in zip(*candidates[group]))
        selections[group] = Selection(whole, b, take_in_bin(taken, budget, hashes, rows, chars))
    return selections


def _task_columns(extract_dir: Path, task: int) -> tuple[list[str], np.ndarray]:
    index = json.loads((extract_dir / f"{task:05d}.index.json").read_text())
    return index["id"], np.array(index["chars"], dtype=np.int64)


def _write_unselected(fh, extract_dir: Path, task: int, source: str, rows: np.ndarray) -> None:
    if not len(rows):
        return
    index = json.loads((extract_dir / f"{task:05d}.index.json").read_text())
    for row in rows.tolist():
        entry = {
            "id": index["id"][row],
            "source": source,
            "pmid": index["pmid"][row],
            "stage": "mix",
            "reason": "downsampled",
            "detail": "not selected by the mixture sampler",
        }
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _save(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
