"""Corpus-wide duplicate resolution with source precedence.

Runs once over the dedup keys of every kept document (never their text), in this order:

1. PubMed ``DeleteCitation``: a deleted PMID leaves every source, except PubMed XML records that
   come later in read order (an update file re-adding a revised citation, as NCBI specifies).
2. Same paper: documents sharing a PMID, DOI or PMCID are one paper; the one from the
   highest-precedence source is kept (full text over abstract, as Meditron does), and within a source
   the latest version. Abstracts that carry no id are matched by content against each full-text
   paper's own abstract (MinHash), so a paper's abstract goes even when the abstract has no PMID.
3. Duplicate ids left after that: a later record with an id already seen is dropped.
4. Exact duplicates of the normalized text.
5. Near duplicates: MinHash LSH candidates verified against the Jaccard threshold. Documents are
   visited best first (source precedence, then read order); one is removed only when it reaches the
   threshold against a document that is kept, so clusters never chain (A~B, B~C does not remove C
   as a copy of A when A and C differ).

"Read order" is (file in the plan, line in the file): it does not depend on how files are split
into tasks.
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
    """Dedup keys of all kept documents (row = position in the extract output)."""

    ids: list[str]
    sources: list[str]
    paper_keys: list[list[str]]  # "pmid:...", "doi:...", "pmcid:..."
    pmids: list[str | None]
    exact: list[str]
    orders: list[tuple[int, int]]
    chars: np.ndarray
    signatures: np.ndarray
    abstract_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # full-text rows ...
    abstract_signatures: np.ndarray | None = None  # ... and the MinHash of their own abstract
    source_rank: np.ndarray = field(init=False)

    def rank_sources(self, ranks: dict[str, int]) -> None:
        self.source_rank = np.array([ranks[s] for s in self.sources], dtype=np.int64)

    def preference(self, row: int, latest_first: bool = False) -> tuple:
        """Sort key: best source first, then read order (or reversed read order)."""
        order = self.orders[row]
        return (self.source_rank[row], tuple(-o for o in order) if latest_first else order)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Removal:
    reason: str
    detail: str


def resolve(
    table: DocTable, deletes: list[tuple[str, tuple[int, int]]], pubmed_sources: set[str], cfg: DedupConfig
) -> dict[int, Removal]:
    removed: dict[int, Removal] = {}
    _apply_deletes(table, deletes, pubmed_sources, removed)
    if cfg.same_paper:
        _same_paper(table, removed)
        if cfg.near.enabled and table.abstract_signatures is not None and len(table.abstract_rows):
            _abstracts_of_papers(table, cfg.near, removed)
    _duplicate_ids(table, removed)
    if cfg.exact:
        _exact(table, removed)
    if cfg.near.enabled and len(table):
        _near(table, cfg, removed)
    return removed


def _apply_deletes(table: DocTable, deletes, pubmed_sources: set[str], removed: dict[int, Removal]) -> None:
    last_delete: dict[str, tuple[int, int]] = {}
    for pmid, order in deletes:
        last_delete[pmid] = max(tuple(order), last_delete.get(pmid, tuple(order)))
    for row, pmid in enumerate(table.pmids):
        when = last_delete.get(pmid) if pmid else None
        if when is None:
            continue
        readded = table.sources[row] in pubmed_sources and tuple(table.orders[row]) > when
        if not readded:
            removed[row] = Removal("deleted_citation", f"PMID {pmid} is in a DeleteCitation list")


def _duplicate_ids(table: DocTable, removed: dict[int, Removal]) -> None:
    first: dict[str, int] = {}
    for row in sorted(range(len(table)), key=lambda r: table.orders[r]):
        if row in removed:
            continue
        doc_id = table.ids[row]
        if doc_id in first:
            removed[row] = Removal(
                "duplicate_id", f"id already used by an earlier record (order {table.orders[first[doc_id]]})"
            )
        else:
            first[doc_id] = row


def _keep_best(groups, table: DocTable, removed: dict[int, Removal], reason: str, latest_first: bool) -> None:
    for rows in groups:
        if len(rows) < 2:
            continue
        best = min(rows, key=lambda r: table.preference(r, latest_first))
        for row in rows:
            if row != best:
                removed[row] = Removal(reason, f"kept {table.ids[best]}")


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _same_paper(table: DocTable, removed: dict[int, Removal]) -> None:
    """Documents linked by any shared PMID, DOI or PMCID form one paper."""
    uf = _UnionFind(len(table))
    owner: dict[str, int] = {}
    for row, keys in enumerate(table.paper_keys):
        if row in removed:
            continue
        for key in keys:
            if key in owner:
                uf.union(owner[key], row)
            else:
                owner[key] = row
    groups: dict[int, list[int]] = defaultdict(list)
    for row, keys in enumerate(table.paper_keys):
        if keys and row not in removed:
            groups[uf.find(row)].append(row)
    _keep_best(groups.values(), table, removed, "same_paper", latest_first=True)


def _abstracts_of_papers(table: DocTable, near, removed: dict[int, Removal]) -> None:
    """Drop lower-precedence documents that match a full-text paper's own abstract."""
    alive = np.array([r for r in range(len(table)) if r not in removed], dtype=np.int64)
    papers = np.array([r for r in table.abstract_rows if r not in removed], dtype=np.int64)
    keep = np.isin(table.abstract_rows, papers)
    if not len(papers) or not len(alive):
        return
    paper_sigs = table.abstract_signatures[keep]
    doc_keys = band_keys(table.signatures[alive], near.bands)
    paper_keys = band_keys(paper_sigs, near.bands)
    for band in range(doc_keys.shape[1]):
        index: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(doc_keys[:, band].tolist()):
            index[key].append(i)
        for p, key in enumerate(paper_keys[:, band].tolist()):
            paper = int(papers[p])
            for i in index.get(key, ()):
                row = int(alive[i])
                if row == paper or row in removed or table.source_rank[row] <= table.source_rank[paper]:
                    continue
                jaccard = float(np.mean(table.signatures[row] == paper_sigs[p]))
                if jaccard >= near.threshold:
                    removed[row] = Removal(
                        "same_paper", f"the abstract of {table.ids[paper]} (estimated Jaccard {jaccard:.2f})"
                    )


def _exact(table: DocTable, removed: dict[int, Removal]) -> None:
    groups: dict[str, list[int]] = defaultdict(list)
    for row, key in enumerate(table.exact):
        if row not in removed:
            groups[key].append(row)
    _keep_best(groups.values(), table, removed, "exact_duplicate", latest_first=False)


def _near(table: DocTable, cfg: DedupConfig, removed: dict[int, Removal]) -> None:
    alive = [r for r in range(len(table)) if r not in removed]
    if len(alive) < 2:
        return
    alive = np.array(sorted(alive, key=table.preference), dtype=np.int64)  # best first
    sigs, threshold = table.signatures, cfg.near.threshold
    similar: dict[int, list[tuple[int, float]]] = defaultdict(list)  # row -> better rows it matches
    keys = band_keys(sigs[alive], cfg.near.bands)
    for band in range(keys.shape[1]):
        for bucket in _buckets(keys[:, band]):
            rows = alive[bucket]
            for i, j in _pairs(len(rows)):
                better, worse = int(rows[i]), int(rows[j])
                jaccard = float(np.mean(sigs[better] == sigs[worse]))
                if jaccard >= threshold:
                    similar[worse].append((better, jaccard))
    kept: set[int] = set()
    for row in alive.tolist():
        match = next(((b, j) for b, j in similar.get(row, ()) if b in kept), None)
        if match is None:
            kept.add(row)
        else:
            removed[row] = Removal("near_duplicate", f"kept {table.ids[match[0]]} (estimated Jaccard {match[1]:.2f})")


def _buckets(keys: np.ndarray):
    """Index arrays of positions sharing a key (only groups of two or more), in ascending order."""
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
