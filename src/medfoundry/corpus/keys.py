"""Dedup keys as sorted record files: how the extract tasks hand their keys to the dedup tasks.

Every extract task writes, per kind of key, one ``.npy`` array of records sorted by ``(key, band)``.
A dedup task owns a range of key values and reads, from every extract task's file, just the slice in
its range (a binary search on a memory map, then a copy): a shuffle by hash range with one file per
extract task and kind, whatever the number of dedup tasks. Keys are hashes: 64-bit MinHash band keys
(a collision only adds a candidate pair, which is verified), and 96 bits of an
xxh3-128 hash for ids, PMIDs, DOIs and normalized texts (``key`` and ``band``: a chance collision among
41M documents has odds of about 1e-14).

Band records carry band 0: the band's number is mixed into their key (``fingerprint.band_keys``).
A record names its document by ``ref = task << 32 | row``, its place in read order by
``order = file_index << 32 | line`` (see ``plan.WorkUnit``), and ``aux`` carries a full-text paper's
index in its task's abstract signatures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xxhash

from medfoundry.io import atomic_path

RECORD = np.dtype([("key", "<u8"), ("band", "<u4"), ("aux", "<u4"), ("ref", "<u8"), ("order", "<u8")])

# kinds of keys written by every extract task
ID, EXACT, PAPER, PMID, DELETE, BAND, ABSTRACT_BAND = "id", "exact", "paper", "pmid", "delete", "band", "abstract_band"
KINDS = (ID, EXACT, PAPER, PMID, DELETE, BAND, ABSTRACT_BAND)
_ROW_BITS = 32


def text_keys(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(key, band)`` columns for identifiers or texts: 96 bits of their xxh3-128 hash."""
    digests = [xxhash.xxh3_128_intdigest(v.encode()) for v in values]
    return (
        np.array([d & 0xFFFFFFFFFFFFFFFF for d in digests], dtype=np.uint64),
        np.array([d >> 96 for d in digests], dtype=np.uint32),
    )


def make_ref(task: np.ndarray | int, row: np.ndarray | int):
    return (np.asarray(task, dtype=np.uint64) << np.uint64(_ROW_BITS)) | np.asarray(row, dtype=np.uint64)


def ref_task(ref: np.ndarray) -> np.ndarray:
    return (np.asarray(ref, dtype=np.uint64) >> np.uint64(_ROW_BITS)).astype(np.int64)


def ref_row(ref: np.ndarray) -> np.ndarray:
    return (np.asarray(ref, dtype=np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.int64)


def make_order(file_index: np.ndarray | int, line: np.ndarray | int):
    return (np.asarray(file_index, dtype=np.uint64) << np.uint64(_ROW_BITS)) | np.asarray(line, dtype=np.uint64)


def order_tuple(order: int) -> tuple[int, int]:
    """``(file index, line)``, as reports show a place in read order."""
    return int(order) >> _ROW_BITS, int(order) & 0xFFFFFFFF


def records(key, band, ref, order, aux=0) -> np.ndarray:
    out = np.empty(len(np.atleast_1d(key)), dtype=RECORD)
    out["key"], out["band"], out["aux"], out["ref"], out["order"] = key, band, aux, ref, order
    return out


def key_file(extract_dir: Path, task: int, kind: str) -> Path:
    return extract_dir / f"{task:05d}.{kind}.keys.npy"


def write_sorted(path: Path, recs: np.ndarray) -> None:
    recs = recs[np.lexsort((recs["ref"], recs["band"], recs["key"]))]
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, recs)


def key_bounds(ranges: int) -> np.ndarray:
    """``ranges + 1`` boundaries splitting the 64-bit key space evenly (the last one inclusive)."""
    return np.array([(i << 64) // ranges for i in range(ranges)] + [1 << 64], dtype=object)


def read_range(path: Path, lo: int, hi: int) -> np.ndarray:
    """The records with ``lo <= key < hi`` (``hi`` may be 2**64), copied out of a memory map."""
    if path.stat().st_size <= 128:  # header only: no records
        return np.zeros(0, dtype=RECORD)
    table = np.load(path, mmap_mode="r")
    keys = table["key"]
    start = int(np.searchsorted(keys, np.uint64(lo), side="left"))
    stop = len(keys) if hi >= 1 << 64 else int(np.searchsorted(keys, np.uint64(hi), side="left"))
    out = np.array(table[start:stop])
    del table, keys
    return out


def gather(extract_dir: Path, tasks: int, kind: str, lo: int, hi: int, where=None) -> np.ndarray:
    """Every extract task's records of ``kind`` in the key range (those ``where(records)`` keeps), sorted
    by ``(key, band, ref)``. Band records all have band 0 (their key mixes the band's number in), so a
    stable sort by key alone gives that order: each task's slice is sorted and refs grow with the task."""
    parts = []
    for t in range(tasks):
        part = read_range(key_file(extract_dir, t, kind), lo, hi)
        parts.append(part[where(part)] if where is not None else part)
    recs = np.concatenate(parts) if parts else np.zeros(0, dtype=RECORD)
    del parts
    if kind in (BAND, ABSTRACT_BAND):
        return recs[np.argsort(recs["key"], kind="stable")]
    return recs[np.lexsort((recs["ref"], recs["band"], recs["key"]))]


def gather_repeated(extract_dir: Path, tasks: int, kind: str, lo: int, hi: int, where=None) -> np.ndarray:
    """:func:`gather` restricted to records whose key another record shares (the only ones that can be in
    a group): a first pass keeps the keys alone (8 of a record's 32 bytes), so memory holds the repeated
    records, not the range."""
    seen = []
    for t in range(tasks):
        part = read_range(key_file(extract_dir, t, kind), lo, hi)
        seen.append(np.array(part["key"][where(part)] if where is not None else part["key"]))
    every = np.sort(np.concatenate(seen)) if seen else np.zeros(0, np.uint64)
    del seen
    repeated = np.unique(every[1:][every[1:] == every[:-1]])
    del every
    return gather(extract_dir, tasks, kind, lo, hi, lambda r: member(r["key"], repeated) & _all(where, r))


def _all(where, recs: np.ndarray) -> np.ndarray:
    return where(recs) if where is not None else np.ones(len(recs), dtype=bool)


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``values`` found in the sorted array ``sorted_set`` (a binary search each)."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def groups(recs: np.ndarray, min_size: int = 2):
    """``(start, stop)`` of each run of records sharing ``(key, band)`` with at least ``min_size`` members;
    ``recs`` sorted by key and band."""
    if len(recs) == 0:
        return
    same = (recs["key"][1:] == recs["key"][:-1]) & (recs["band"][1:] == recs["band"][:-1])
    starts = np.flatnonzero(np.r_[True, ~same])
    stops = np.r_[starts[1:], len(recs)]
    for start, stop in zip(starts.tolist(), stops.tolist()):
        if stop - start >= min_size:
            yield start, stop


def in_groups(recs: np.ndarray, min_size: int = 2) -> np.ndarray:
    """The records that belong to a group of at least ``min_size``."""
    keep = np.zeros(len(recs), dtype=bool)
    for start, stop in groups(recs, min_size):
        keep[start:stop] = True
    return recs[keep]
