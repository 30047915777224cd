"""The corpus's train/val shards, written by two rounds of parallel tasks.

``ScatterDocuments`` (one task per extract task): reads the task's documents once, writes each kept
copy (ids ``X``, ``X#1``, ...) as a JSON line into the piece of the shard a seeded hash of its id
chooses, all pieces of the task in one file with their offsets, and tallies documents, characters and
(with a report tokenizer) tokens. ``GatherShard`` (one task per shard): reads its piece from every
task's file, orders the lines by a seeded hash of their bytes and writes the shard. A shard's content
and order depend only on the documents, never on tasks or workers, so the output is byte-identical
whatever the parallelism; memory holds one task's kept text, then one shard.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash
from datatrove.pipeline.base import PipelineStep

from medfoundry.io import atomic_open, atomic_path
from medfoundry.model.load import load_backend_tokenizer

_TOKENIZE_BATCH = 256


@lru_cache(maxsize=1)
def _tokenizer(path: str):
    return load_backend_tokenizer(path)


def shard_of(doc_id: str, copy: int, seed: int, shards: int) -> int:
    return xxhash.xxh64_intdigest(f"{doc_id}#{copy}".encode(), seed=seed) % shards


def shard_names(sizes: dict[str, int], shard_docs: int) -> list[str]:
    """Every output shard, train's then val's (``{split}/part-XXXXX.jsonl.gz``)."""
    return [
        f"{split}/part-{i:05d}.jsonl.gz"
        for split in ("train", "val")
        for i in range(max(1, -(-sizes[split] // shard_docs)))
    ]


class ScatterDocuments(PipelineStep):
    name = "scatter documents"
    type = "💽 - WRITER"

    def __init__(
        self, extract_dir: str, mix_dir: str, out_dir: str, names: list[str], seed: int, tokenizer: str | None
    ):
        super().__init__()
        self.extract_dir, self.mix_dir, self.out_dir = Path(extract_dir), Path(mix_dir), Path(out_dir)
        self.names, self.seed, self.tokenizer = names, seed, tokenizer

    def run(self, data, rank: int = 0, world_size: int = 1):
        with self.track_time():
            with np.load(self.mix_dir / f"{rank:05d}.npz") as mix:
                copies, val = mix["copies"], mix["val"]
            shards = {
                split: [i for i, n in enumerate(self.names) if n.startswith(f"{split}/")] for split in ("train", "val")
            }
            pieces: list[list[str]] = [[] for _ in self.names]
            tally = _Tally(_tokenizer(self.tokenizer) if self.tokenizer else None)
            with gzip.open(self.extract_dir / f"{rank:05d}.docs.jsonl.gz", "rb") as lines:
                for row, line in enumerate(lines):
                    if not copies[row]:
                        continue
                    split = "val" if val[row] else "train"
                    doc = json.loads(line)
                    tally.add(split, doc["source"], doc["text"], int(copies[row]))
                    base_id, targets = doc["id"], shards[split]
                    for copy in range(int(copies[row])):
                        doc["id"] = f"{base_id}#{copy}" if copy else base_id
                        target = targets[shard_of(doc["id"], copy, self.seed, len(targets))]
                        pieces[target].append(json.dumps(doc, ensure_ascii=False) + "\n")
            tally.flush()
            blobs = [("".join(p)).encode() for p in pieces]
            offsets = np.r_[0, np.cumsum([len(b) for b in blobs])].astype(np.int64)
            stem = self.out_dir / f"{rank:05d}"
            with atomic_path(f"{stem}.pieces") as tmp, open(tmp, "wb") as fh:
                fh.writelines(blobs)
            with atomic_open(f"{stem}.tally.json") as fh:
                json.dump({"counts": tally.counts, "offsets": offsets.tolist()}, fh)
        self.stat_update("copies", value=int(copies.sum()))
        return
        yield  # a generator: datatrove drains every step


class GatherShard(PipelineStep):
    name = "gather shard"
    type = "💽 - WRITER"

    def __init__(self, scatter_dir: str, staging: str, names: list[str], tasks: int, seed: int, compresslevel: int):
        super().__init__()
        self.scatter_dir, self.staging = Path(scatter_dir), Path(staging)
        self.names, self.tasks, self.seed, self.compresslevel = names, tasks, seed, compresslevel

    def run(self, data, rank: int = 0, world_size: int = 1):
        with self.track_time():
            lines: list[bytes] = []
            for task in range(self.tasks):
                stem = self.scatter_dir / f"{task:05d}"
                offsets = json.loads(Path(f"{stem}.tally.json").read_text())["offsets"]
                start, stop = offsets[rank], offsets[rank + 1]
                if stop > start:
                    with open(f"{stem}.pieces", "rb") as fh:
                        lines += os.pread(fh.fileno(), stop - start, start).splitlines(keepends=True)
            lines.sort(key=lambda line: xxhash.xxh64_intdigest(line, seed=self.seed))
            with atomic_open(self.staging / self.names[rank], "wb", compresslevel=self.compresslevel) as out:
                out.writelines(lines)
        self.stat_update("lines", value=len(lines))
        return
        yield  # a generator: datatrove drains every step


class _Tally:
    """Documents, characters and (with a tokenizer) tokens per split and source, as written."""

    def __init__(self, tokenizer=None):
        self.counts: dict[str, dict[str, dict[str, int]]] = {"train": {}, "val": {}}
        self.tokenizer = tokenizer
        self._pending: list[tuple[str, str, str, int]] = []

    def add(self, split: str, source: str, text: str, copies: int) -> None:
        entry = self.counts[split].setdefault(
            source, {"docs": 0, "chars": 0, **({"tokens": 0} if self.tokenizer else {})}
        )
        entry["docs"] += copies
        entry["chars"] += copies * len(text)
        if self.tokenizer:
            self._pending.append((split, source, text, copies))
            if len(self._pending) >= _TOKENIZE_BATCH:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        encodings = self.tokenizer.encode_batch([text for _, _, text, _ in self._pending], add_special_tokens=False)
        for (split, source, _, copies), enc in zip(self._pending, encodings):
            self.counts[split][source]["tokens"] += copies * len(enc.ids)
        self._pending.clear()


def merge_tallies(scatter_dir: Path, tasks: int) -> dict:
    """The per-task tallies summed: ``{split: {source: {docs, chars[, tokens]}}}``."""
    counts: dict[str, dict[str, dict[str, int]]] = {"train": {}, "val": {}}
    for task in range(tasks):
        tally = json.loads((scatter_dir / f"{task:05d}.tally.json").read_text())["counts"]
        for split, sources in tally.items():
            for source, entry in sources.items():
                total = counts[split].setdefault(source, dict.fromkeys(entry, 0))
                for key, value in entry.items():
                    total[key] += value
    return counts
