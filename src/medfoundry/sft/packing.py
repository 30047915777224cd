"""Fitting examples into ``max_length`` and packing several into one training sequence.

Truncation never shortens a response: ``left_prompt`` cuts prompt tokens from the left only while
every loss-carrying token (and at least one token before the first, which predicts it) survives;
an example whose responses alone do not fit is dropped and counted, as with ``drop``. ``error``
stops with the record's location. Packing is best fit over a seeded shuffle: each example goes into
the fullest open sequence that still has room for it, which fills sequences nearly completely
(O(n log n) with a sorted list of free capacities) and is deterministic for a seed.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

KEPT, TRUNCATED, DROPPED = "kept", "truncated", "dropped"


def fit_length(ids: np.ndarray, loss: np.ndarray, max_length: int, mode: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``(ids, loss, status)`` with the example cut to ``max_length`` tokens if ``mode`` allows it.

    Status is ``kept``, ``truncated`` or ``dropped``; in ``error`` mode an over-long example comes back
    ``dropped`` too and the caller raises with the record's location.
    """
    if len(ids) <= max_length:
        return ids, loss, KEPT
    if mode == "left_prompt":
        cut = len(ids) - max_length
        first_target = int(np.argmax(loss)) if loss.any() else len(ids)
        if cut < first_target:
            return ids[cut:], loss[cut:], TRUNCATED
    return ids[:0], loss[:0], DROPPED


def pack(lengths: np.ndarray, max_length: int, seed: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens (best fit, seeded order)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    free: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        slot = bisect_left(free, (n, -1))
        if slot < len(free):
            remaining, row = free.pop(slot)
        else:
            remaining, row = max_length, len(rows)
            rows.append([])
        rows[row].append(int(i))
        if remaining - n > 0:
            insort(free, (remaining - n, row))
    return rows
