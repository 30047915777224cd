"""Corpus-wide duplicate resolution with source precedence, as parallel tasks over key ranges.

The rules, applied in this order to the documents the previous ones left:

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

How it runs, with memory bounded whatever the corpus size: the extract tasks write sorted key records
(``keys.py``). Round 1 is ``ranges`` parallel tasks, each owning a range of key values: it joins
deletions to PMIDs, finds the groups of two or more documents sharing an id, a paper id or a text, and
the documents whose band keys meet a full-text paper's abstract's (verified by Jaccard). One process
then applies rules 1-4 to those candidates only, in order, and writes which documents are still alive
(one byte per document). Round 2 finds near-duplicate pairs among the living, bucket by bucket, and
one process applies rule 5 to the verified pairs. datatrove's MinHash stages bucket and cluster in one
pass and keep the first document of a cluster; they know neither source precedence nor the rules
before near dedup, and their union-find chains clusters (rule 5 forbids that), so only the idea of
sorted per-task band files read by hash-range tasks is borrowed from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from medfoundry.corpus import keys
from medfoundry.corpus.config import DedupConfig
from medfoundry.io import atomic_path

_ALL_PAIRS_MAX = 32  # buckets up to this size are verified pair by pair; larger ones against their best member
_RECORD_SHARE = 3  # a task's records take at most 1/this of its memory budget (gathering and sorting copy them)

# removal reasons, as stored between the stages (see ``Removals``)
DELETED, SAME_PAPER, ABSTRACT, DUPLICATE_ID, EXACT, NEAR = range(6)
REASONS = {
    DELETED: "deleted_citation",
    SAME_PAPER: "same_paper",
    ABSTRACT: "same_paper",
    DUPLICATE_ID: "duplicate_id",
    EXACT: "exact_duplicate",
    NEAR: "near_duplicate",
}


@dataclass
class Layout:
    """The extract tasks as the dedup stage sees them: rows per task, each task's source precedence rank
    and whether its source is PubMed XML (whose later records may re-add a deleted PMID)."""

    rows: np.ndarray
    rank: np.ndarray
    pubmed: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.rows)].astype(np.int64)

    def index(self, refs: np.ndarray) -> np.ndarray:
        """Global row (extract order) of each ref."""
        return self.offsets[keys.ref_task(refs)] + keys.ref_row(refs)

    def ranks(self, refs: np.ndarray) -> np.ndarray:
        return self.rank[keys.ref_task(refs)]

    def to_json(self) -> dict:
        return {"rows": self.rows.tolist(), "rank": self.rank.tolist(), "pubmed": self.pubmed.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        return cls(*(np.array(data[k], dtype=t) for k, t in (("rows", np.int64), ("rank", np.int64), ("pubmed", bool))))


def plan_ranges(extract_dir: Path, tasks: int, budget_mb: int) -> int:
    """Number of key ranges so that one dedup task's records fit its share of the memory budget."""
    sizes = [keys.key_file(extract_dir, t, kind).stat().st_size for t in range(tasks) for kind in keys.KINDS]
    return max(1, -(-sum(sizes) // (budget_mb * 2**20 // _RECORD_SHARE)))


class DedupRange(PipelineStep):
    """One key range of a dedup round (task ``rank`` of ``ranges``); writes ``{rank}.npz`` atomically."""

    name = "dedup"
    type = "🫂 - DEDUP"

    def __init__(self, extract_dir: str, work_dir: str, round_: int, ranges: int, layout: dict, cfg: DedupConfig):
        super().__init__()
        self.extract_dir, self.work_dir = Path(extract_dir), Path(work_dir)
        self.round, self.ranges, self.layout, self.cfg = round_, ranges, layout, cfg

    def run(self, data, rank: int = 0, world_size: int = 1):
        bounds = keys.key_bounds(self.ranges)
        lo, hi = int(bounds[rank]), int(bounds[rank + 1])
        layout = Layout.from_json(self.layout)
        with self.track_time():
            if self.round == 1:
                out = _round_one(self.extract_dir, layout, self.cfg, lo, hi)
            else:
                alive = np.load(self.work_dir / "alive.npy")
                out = _near_edges(self.extract_dir, layout, self.cfg, lo, hi, alive)
            path = self.work_dir / f"round{self.round}" / f"{rank:05d}.npz"
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **out)
        for name, value in out.items():
            self.stat_update(name, value=len(value))
        return
        yield  # a generator: datatrove drains every step


def _round_one(extract_dir: Path, layout: Layout, cfg: DedupConfig, lo: int, hi: int) -> dict[str, np.ndarray]:
    tasks = len(layout.rows)
    out = {
        "deleted": _deleted(keys.gather(extract_dir, tasks, keys.PMID, lo, hi), extract_dir, layout, lo, hi),
        "ids": keys.in_groups(keys.gather_repeated(extract_dir, tasks, keys.ID, lo, hi)),
    }
    papers = keys.gather_repeated(extract_dir, tasks, keys.PAPER, lo, hi) if cfg.same_paper else _none()
    out["papers"] = keys.in_groups(papers)
    out["exact"] = (
        keys.in_groups(keys.gather_repeated(extract_dir, tasks, keys.EXACT, lo, hi)) if cfg.exact else _none()
    )
    pairs = _abstract_pairs(extract_dir, layout, cfg, lo, hi) if cfg.same_paper and cfg.near.enabled else _no_pairs()
    out.update(zip(("abstract_doc", "abstract_paper", "abstract_jaccard"), pairs))
    return out


def _no_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float64)


def _none() -> np.ndarray:
    return np.zeros(0, dtype=keys.RECORD)


def _deleted(pmids: np.ndarray, extract_dir: Path, layout: Layout, lo: int, hi: int) -> np.ndarray:
    """Refs of the documents a ``DeleteCitation`` removes (rule 1)."""
    deletes = keys.gather(extract_dir, len(layout.rows), keys.DELETE, lo, hi)
    last: dict[tuple[int, int], int] = {}
    for key, band, order in zip(deletes["key"].tolist(), deletes["band"].tolist(), deletes["order"].tolist()):
        last[key, band] = max(order, last.get((key, band), order))
    if not last:
        return np.zeros(0, dtype=np.uint64)
    when = np.array([last.get(kb, -1) for kb in zip(pmids["key"].tolist(), pmids["band"].tolist())], dtype=np.int64)
    hit = when >= 0
    readded = layout.pubmed[keys.ref_task(pmids["ref"])] & (pmids["order"].astype(np.int64) > when)
    return np.sort(pmids["ref"][hit & ~readded])


def _abstract_pairs(extract_dir: Path, layout: Layout, cfg: DedupConfig, lo: int, hi: int):
    """``(doc refs, paper refs, Jaccards)``: documents of a lower-precedence source whose signature
    reaches the threshold against a full-text paper's own abstract, found through shared band keys."""
    tasks = len(layout.rows)
    papers = keys.gather(extract_dir, tasks, keys.ABSTRACT_BAND, lo, hi)
    if not len(papers):
        return _no_pairs()
    paper_keys = np.unique(papers["key"])
    docs = keys.gather(extract_dir, tasks, keys.BAND, lo, hi, lambda r: keys.member(r["key"], paper_keys))
    both = np.concatenate([papers, docs])
    is_paper = np.r_[np.ones(len(papers), bool), np.zeros(len(docs), bool)]
    order = np.lexsort((both["band"], both["key"]))
    both, is_paper = both[order], is_paper[order]
    candidates = set()
    for start, stop in keys.groups(both):
        members, paper_mask = both[start:stop], is_paper[start:stop]
        for p in members[paper_mask]:
            for d in members[~paper_mask]:
                if d["ref"] != p["ref"] and layout.rank[keys.ref_task(d["ref"])] > layout.rank[keys.ref_task(p["ref"])]:
                    candidates.add((int(d["ref"]), int(p["ref"]), int(p["aux"])))
    if not candidates:
        return _no_pairs()
    doc_ref, paper_ref, aux = (np.array(c, dtype=np.uint64) for c in zip(*sorted(candidates)))
    doc_sigs = Signatures(extract_dir, "minhash").read(doc_ref)
    paper_sigs = Signatures(extract_dir, "abstract_minhash").read(keys.make_ref(keys.ref_task(paper_ref), aux))
    jaccard = (doc_sigs == paper_sigs).mean(axis=1)
    hit = jaccard >= cfg.near.threshold
    return doc_ref[hit], paper_ref[hit], jaccard[hit]


class Signatures:
    """Rows of the extract tasks' signature files, read with ``pread``: a memory map would keep every
    page touched resident, and candidate rows are scattered over the whole corpus."""

    def __init__(self, extract_dir: Path, name: str):
        self.extract_dir, self.name = extract_dir, name

    def read(self, refs: np.ndarray) -> np.ndarray:
        tasks, rows = keys.ref_task(refs), keys.ref_row(refs)
        out = None
        for task in np.unique(tasks).tolist():
            path = self.extract_dir / f"{task:05d}.{self.name}.npy"
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(fh)
                start = fh.tell()
                if out is None:
                    out = np.empty((len(refs), shape[1]), dtype=dtype)
                width = shape[1] * dtype.itemsize
                for i in np.flatnonzero(tasks == task).tolist():
                    data = os.pread(fh.fileno(), width, start + int(rows[i]) * width)
                    out[i] = np.frombuffer(data, dtype=dtype)
        return out if out is not None else np.zeros((0, 0), dtype=np.uint32)


def _near_edges(extract_dir: Path, layout: Layout, cfg: DedupConfig, lo: int, hi: int, alive: np.ndarray) -> dict:
    """Verified near-duplicate pairs among living documents sharing a band key (``better``, ``worse``
    refs, their orders, ``jaccard``): every pair in a bucket of up to ``_ALL_PAIRS_MAX``, else each member
    against the bucket's best (source precedence, then read order)."""
    living = lambda r: alive[layout.index(r["ref"])]  # noqa: E731
    recs = keys.in_groups(keys.gather_repeated(extract_dir, len(layout.rows), keys.BAND, lo, hi, living))
    recs = recs[np.lexsort((recs["order"], layout.ranks(recs["ref"]), recs["band"], recs["key"]))]
    pairs, orders = set(), {}
    for start, stop in keys.groups(recs):
        refs = recs["ref"][start:stop].tolist()
        orders.update(zip(refs, recs["order"][start:stop].tolist()))
        n = len(refs)
        if n <= _ALL_PAIRS_MAX:
            pairs.update((refs[i], refs[j]) for i in range(n) for j in range(i + 1, n))
        else:
            pairs.update((refs[0], refs[j]) for j in range(1, n))
    names = ("better", "worse", "jaccard", "better_order", "worse_order")
    if not pairs:
        return dict(zip(names, (*_no_pairs(), np.zeros(0, np.uint64), np.zeros(0, np.uint64))))
    better, worse = (np.array(c, dtype=np.uint64) for c in zip(*sorted(pairs)))
    signatures = Signatures(extract_dir, "minhash")
    jaccard = (signatures.read(better) == signatures.read(worse)).mean(axis=1)
    hit = jaccard >= cfg.near.threshold
    better, worse = better[hit], worse[hit]
    order_of = np.vectorize(orders.__getitem__, otypes=[np.uint64])
    return dict(zip(names, (better, worse, jaccard[hit], order_of(better), order_of(worse))))
