"""The rules of ``dedup.py`` applied, in order, by one process to the candidates the dedup tasks found.

Everything here is proportional to the duplicates, not to the corpus: groups of two or more documents
sharing a key, verified pairs, and the removals (a dict by global row); the only per-document state is
``alive.npy``, one byte per document, which round 2's tasks read (and ``kept.npy`` after round 2).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from medfoundry.corpus import keys
from medfoundry.corpus.config import DedupConfig
from medfoundry.corpus.dedup import ABSTRACT, DELETED, DUPLICATE_ID, EXACT, NEAR, REASONS, SAME_PAPER, Layout
from medfoundry.io import atomic_open, atomic_path

Removed = dict[int, tuple[int, int, float]]  # global row -> (reason, ref or order it lost to, Jaccard)


def _concat(work_dir: Path, round_: int, ranges: int, name: str) -> np.ndarray:
    """One array of every range's output ``name`` (ranges cover ascending keys, so records stay sorted)."""
    parts = []
    for r in range(ranges):
        with np.load(work_dir / f"round{round_}" / f"{r:05d}.npz") as data:
            parts.append(data[name])
    return np.concatenate(parts)


def _living(recs: np.ndarray, layout: Layout, removed: Removed) -> np.ndarray:
    """The records of documents not yet removed, in groups of two or more."""
    dead = np.fromiter(removed, dtype=np.int64, count=len(removed))
    return keys.in_groups(recs[~np.isin(layout.index(recs["ref"]), dead)])


def _firsts(recs: np.ndarray, *preference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups sharing ``(key, band)``: ``(losers, winner of each loser)``, the winner being the first
    member by ``preference`` (sort keys, most significant first)."""
    if not len(recs):
        return recs, recs
    recs = recs[np.lexsort((*reversed(preference), recs["band"], recs["key"]))]
    first = np.r_[True, (recs["key"][1:] != recs["key"][:-1]) | (recs["band"][1:] != recs["band"][:-1])]
    winner = np.flatnonzero(first)[np.cumsum(first) - 1]
    return recs[~first], recs[winner[~first]]


def resolve_round_one(work_dir: Path, ranges: int, layout: Layout, cfg: DedupConfig) -> Removed:
    """Rules 1-4 over round 1's candidates; writes ``alive.npy`` for round 2."""
    removed: Removed = {}
    for row in layout.index(_concat(work_dir, 1, ranges, "deleted")).tolist():
        removed[row] = (DELETED, 0, 0.0)
    if cfg.same_paper:
        _same_paper(_living(_concat(work_dir, 1, ranges, "papers"), layout, removed), layout, removed)
        if cfg.near.enabled:
            pairs = (_concat(work_dir, 1, ranges, f"abstract_{n}") for n in ("doc", "paper", "jaccard"))
            _abstracts(*pairs, layout, removed)
    ids = _living(_concat(work_dir, 1, ranges, "ids"), layout, removed)
    _lose(removed, layout, *_firsts(ids, ids["order"]), DUPLICATE_ID, by_order=True)
    if cfg.exact:
        texts = _living(_concat(work_dir, 1, ranges, "exact"), layout, removed)
        _lose(removed, layout, *_firsts(texts, layout.ranks(texts["ref"]), texts["order"]), EXACT)
    write_alive(work_dir / "alive.npy", layout, removed)
    return removed


def write_alive(path: Path, layout: Layout, removed: Removed) -> None:
    """One byte per document: not removed."""
    alive = np.ones(int(layout.rows.sum()), dtype=bool)
    alive[np.fromiter(removed, dtype=np.int64, count=len(removed))] = False
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, alive)


def _lose(removed: Removed, layout: Layout, losers, winners, reason: int, by_order: bool = False) -> None:
    others = winners["order"] if by_order else winners["ref"]
    for row, other in zip(layout.index(losers["ref"]).tolist(), others.tolist()):
        removed[row] = (reason, other, 0.0)


def _same_paper(recs: np.ndarray, layout: Layout, removed: Removed) -> None:
    """Documents linked by any shared PMID, DOI or PMCID (transitively) are one paper: the best source
    keeps it, the latest version within a source."""
    if not len(recs):
        return
    nodes, node_of = np.unique(recs["ref"], return_inverse=True)
    linked = (recs["key"][1:] == recs["key"][:-1]) & (recs["band"][1:] == recs["band"][:-1])
    a, b = node_of[:-1][linked], node_of[1:][linked]
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(len(nodes), len(nodes)))
    _, component = connected_components(graph, directed=False)
    order = np.zeros(len(nodes), dtype=np.uint64)
    order[node_of] = recs["order"]
    best = np.lexsort((~order, layout.ranks(nodes), component))  # latest first within a source
    first = np.r_[True, component[best][1:] != component[best][:-1]]
    winner = best[np.flatnonzero(first)[np.cumsum(first) - 1]]
    losers = best[~first]
    for row, win in zip(layout.index(nodes[losers]).tolist(), nodes[winner[~first]].tolist()):
        removed[row] = (SAME_PAPER, win, 0.0)


def _abstracts(doc: np.ndarray, paper: np.ndarray, jaccard: np.ndarray, layout: Layout, removed: Removed) -> None:
    """Documents matching a living full-text paper's own abstract go (the lowest paper ref names it)."""
    dead = np.fromiter(removed, dtype=np.int64, count=len(removed))
    living = ~np.isin(layout.index(doc), dead) & ~np.isin(layout.index(paper), dead)
    doc, paper, jaccard = doc[living], paper[living], jaccard[living]
    order = np.lexsort((paper, doc))
    seen: set[int] = set()
    for d, p, j in zip(doc[order].tolist(), paper[order].tolist(), jaccard[order].tolist()):
        if d not in seen:
            seen.add(d)
            removed[int(layout.index(np.array([d], dtype=np.uint64))[0])] = (ABSTRACT, p, j)


def resolve_round_two(work_dir: Path, ranges: int, layout: Layout, removed: Removed) -> None:
    """Rule 5 over round 2's verified pairs: best first, removed only against a kept document."""
    better, worse, jaccard, better_order, worse_order = (
        _concat(work_dir, 2, ranges, n) for n in ("better", "worse", "jaccard", "better_order", "worse_order")
    )
    if not len(better):
        return
    refs = np.r_[better, worse]
    nodes, first = np.unique(refs, return_index=True)
    orders = np.r_[better_order, worse_order][first]
    rank_of = np.empty(len(nodes), dtype=np.int64)
    rank_of[np.lexsort((orders, layout.ranks(nodes)))] = np.arange(len(nodes))  # preference position
    b, w = rank_of[np.searchsorted(nodes, better)], rank_of[np.searchsorted(nodes, worse)]
    by_worse = np.lexsort((b, w))
    node_at = np.empty(len(nodes), dtype=np.uint64)
    node_at[rank_of] = nodes
    kept = np.zeros(len(nodes), dtype=bool)
    edge = 0
    for position in range(len(nodes)):
        match = None
        while edge < len(by_worse) and w[by_worse[edge]] == position:
            e = by_worse[edge]
            if match is None and kept[b[e]]:
                match = e
            edge += 1
        if match is None:
            kept[position] = True
        else:
            row = int(layout.index(node_at[position : position + 1])[0])
            removed[row] = (NEAR, int(node_at[b[match]]), float(jaccard[match]))


def write_entries(path: Path, extract_dir: Path, layout: Layout, sources: list[str], removed: Removed) -> None:
    """The dedup part of ``dropped.jsonl.gz`` (id, source, pmid, stage, reason, detail), in row order,
    reading one extract task's index at a time."""
    names = _referenced_ids(extract_dir, layout, removed)
    offsets = layout.offsets
    with atomic_open(path, compresslevel=1) as fh:
        for task, rows in _by_task(sorted(removed), offsets):
            index = _index(extract_dir, task)
            for row in rows:
                reason, other, jaccard = removed[row]
                local = row - int(offsets[task])
                pmid = index["pmid"][local]
                entry = {
                    "id": index["id"][local],
                    "source": sources[task],
                    "pmid": pmid,
                    "stage": "dedup",
                    "reason": REASONS[reason],
                    "detail": _detail(reason, other, jaccard, pmid, names),
                }
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _detail(reason: int, other: int, jaccard: float, pmid: str | None, names: dict[int, str]) -> str:
    if reason == DELETED:
        return f"PMID {pmid} is in a DeleteCitation list"
    if reason == DUPLICATE_ID:
        return f"id already used by an earlier record (order {keys.order_tuple(other)})"
    if reason == ABSTRACT:
        return f"the abstract of {names[other]} (estimated Jaccard {jaccard:.2f})"
    if reason == NEAR:
        return f"kept {names[other]} (estimated Jaccard {jaccard:.2f})"
    return f"kept {names[other]}"


def _referenced_ids(extract_dir: Path, layout: Layout, removed: Removed) -> dict[int, str]:
    """Ids of the documents that removals name as kept (their refs -> ids)."""
    refs = sorted({other for reason, other, _ in removed.values() if reason not in (DELETED, DUPLICATE_ID)})
    names: dict[int, str] = {}
    tasks = keys.ref_task(np.array(refs, dtype=np.uint64)).tolist()
    for task, group in itertools.groupby(zip(tasks, refs), key=lambda pair: pair[0]):
        ids = _index(extract_dir, task)["id"]
        names.update((ref, ids[ref & 0xFFFFFFFF]) for _, ref in group)
    return names


def _by_task(rows: list[int], offsets: np.ndarray) -> Iterator[tuple[int, list[int]]]:
    """Sorted global rows grouped by their extract task."""
    tasks = (np.searchsorted(offsets, rows, side="right") - 1).tolist()
    for task, group in itertools.groupby(zip(tasks, rows), key=lambda pair: pair[0]):
        yield task, [row for _, row in group]


def _index(extract_dir: Path, task: int) -> dict:
    return json.loads((extract_dir / f"{task:05d}.index.json").read_text())
