"""Corpus-wide duplicate resolution with source precedence.

Runs once over the dedup keys of every kept document (never their text), in this order:

1. PubMed ``DeleteCitation``: a deleted PMID leaves every source, except PubMed XML records that
   come later in file order (an update file re-adding a revised citation, as NCBI specifies).
2. Same paper: documents sharing a PMID are one paper; the one from the highest-precedence source
   is kept (full text over abstract, as Meditron does), and within a source the latest version.
3. Exact duplicates of the normalized text.
4. Near duplicates: MinHash LSH candidates verified against the Jaccard threshold, clustered
   with union-find; each cluster keeps its highest-precedence document.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from medfoundry.corpus.config import DedupConfig
from medfoundry.corpus.fingerprint import band_keys

_ALL_PAIRS_MAX = 32  # buckets up to this size are verified pair by pair; larger ones against their best member


@dataclass
class DocTable:
    """Dedup keys of all kept documents, in global read order (row = order)."""

    ids: list[str]
    sources: list[str]
    pmids: list[str | None]
    exact: list[str]
    orders: list[tuple[int, int]]
    chars: np.ndarray
    signatures: np.ndarray
    source_rank: np.ndarray = field(init=False)

    def rank_sources(self, ranks: dict[str, int]) -> None:
        self.source_rank = np.array([ranks[s] for s in self.sources], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Removal:
    reason: str
    detail: str


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def resolve(table: DocTable, deletes: list[tuple[str, tuple[int, int]]], pubmed_sources: set[str], cfg: DedupConfig) -> dict[int, Removal]:
    removed: dict[int, Removal] = {}
    _apply_deletes(table, deletes, pubmed_sources, removed)
    if cfg.same_paper:
        _same_paper(table, removed)
    if cfg.exact:
        _exact(table, removed)
    if cfg.near.enabled and len(table):
        _near(table, cfg, removed)
    return removed


def _apply_deletes(table: DocTable, deletes, pubmed_sources: set[str], removed: dict[int, Removal]) -> None:
    last_delete: dict[str, tuple[int, int]] = {}
    for pmid, order in deletes:
        last_delete[pmid] = max(order, last_delete.get(pmid, order))
    if not last_delete:
        return
    for row, pmid in enumerate(table.pmids):
        when = last_delete.get(pmid) if pmid else None
        if when is None:
            continue
        readded = table.sources[row] in pubmed_sources and tuple(table.orders[row]) > tuple(when)
        if not readded:
            removed[row] = Removal("deleted_citation", f"PMID {pmid} is in a DeleteCitation list")


def _keep_best(groups: dict, table: DocTable, removed: dict[int, Removal], reason: str, prefer_latest: bool) -> None:
    for rows in groups.values():
        if len(rows) < 2:
            continue
        best = min(rows, key=lambda r: (table.source_rank[r], -r if prefer_latest else r))
        for row in rows:
            if row != best:
                removed[row] = Removal(reason, f"kept {table.ids[best]}")


def _same_paper(table: DocTable, removed: dict[int, Removal]) -> None:
    groups: dict[str, list[int]] = defaultdict(list)
    for row, pmid in enumerate(table.pmids):
        if pmid and row not in removed:
            groups[pmid].append(row)
    _keep_best(groups, table, removed, "same_paper", prefer_latest=True)


def _exact(table: DocTable, removed: dict[int, Removal]) -> None:
    groups: dict[str, list[int]] = defaultdict(list)
    for row, key in enumerate(table.exact):
        if row not in removed:
            groups[key].append(row)
    _keep_best(groups, table, removed, "exact_duplicate", prefer_latest=False)


def _near(table: DocTable, cfg: DedupConfig, removed: dict[int, Removal]) -> None:
    alive = np.array([r for r in range(len(table)) if r not in removed], dtype=np.int64)
    if len(alive) < 2:
        return
    sigs = table.signatures
    # preference order: candidates in a bucket are compared with their best-ranked member first
    preference = np.lexsort((alive, table.source_rank[alive]))
    alive = alive[preference]
    keys = band_keys(sigs[alive], cfg.near.bands)
    uf = _UnionFind(len(table))
    threshold = cfg.near.threshold
    for band in range(keys.shape[1]):
        for bucket in _buckets(keys[:, band]):
            rows = alive[bucket]
            pairs = _pairs(len(rows))
            for i, j in pairs:
                a, b = rows[i], rows[j]
                if np.mean(sigs[a] == sigs[b]) >= threshold:
                    uf.union(a, b)
    clusters: dict[int, list[int]] = defaultdict(list)
    for row in alive:
        clusters[uf.find(row)].append(int(row))
    for rows in clusters.values():
        if len(rows) < 2:
            continue
        best = min(rows, key=lambda r: (table.source_rank[r], r))
        for row in rows:
            if row != best:
                jaccard = float(np.mean(sigs[row] == sigs[best]))
                removed[row] = Removal("near_duplicate", f"kept {table.ids[best]} (estimated Jaccard {jaccard:.2f})")


def _buckets(keys: np.ndarray):
    """Index arrays of positions sharing a key (only groups of two or more), in stable order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    for start, end in zip(starts, ends):
        if end - start > 1:
            yield np.sort(order[start:end])


def _pairs(n: int):
    if n <= _ALL_PAIRS_MAX:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    return [(0, j) for j in range(1, n)]
