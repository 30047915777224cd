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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xxhash

from medfoundry.corpus.config import CorpusConfig
from medfoundry.errors import MedfoundryError


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


def copies_for(rows: np.ndarray, ids: list[str], chars: np.ndarray, factor: float, seed: int) -> np.ndarray:
    """Number of copies of each row so that the source's characters are ``factor`` times its own."""
    whole = math.floor(factor)
    copies = np.full(len(rows), whole, dtype=np.int64)
    budget = (factor - whole) * chars[rows].sum()
    if budget <= 0:
        return copies
    order = sorted(range(len(rows)), key=lambda i: unit_hash(seed, ids[rows[i]]))
    taken = 0.0
    for i in order:
        size = chars[rows[i]]
        if taken + size / 2 > budget:
            break
        copies[i] += 1
        taken += size
    return copies
