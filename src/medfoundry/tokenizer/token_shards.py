"""Reading packed token shards (written by :mod:`medfoundry.tokenizer.shards`): one split memory-mapped as one
long token array, checked against its ``index.json``. Apart from the builder, so that what trains and evaluates
does not import the builder's datatrove pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medfoundry.errors import InputError
from medfoundry.io import CHECKSUM, file_checksum


class TokenShards:
    """One tokenized split, memory-mapped, read as one long token array.

    Opening checks index.json against the files' sizes, so a truncated or mismatched shard fails here
    with the file name instead of producing silently shifted training windows; :meth:`verify` (or
    ``verify=True``) also checks every file's checksum, which reads the whole split.
    """

    def __init__(self, split_dir: str | Path, verify: bool = False):
        split_dir = Path(split_dir)
        index_path = split_dir / "index.json"
        if not index_path.is_file():
            raise InputError(str(split_dir), "no index.json: not a token shard directory (run tokenize_corpus)")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(str(index_path), f"unreadable ({exc}); run the tokenization again to rewrite it") from None
        if not index.get("complete"):
            raise InputError(str(index_path), "tokenization did not finish; run it again to complete it")
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.eos_id: int = index["eos_id"]
        self.vocab_size: int = index["vocab_size"]
        self._bins = [self._open_bin(split_dir, e) for e in index["shards"]]
        self._idx = [self._open_idx(split_dir, e) for e in index["shards"]]
        self._token_starts = np.cumsum([0] + [len(b) for b in self._bins])
        self._doc_starts = np.cumsum([0] + [len(i) for i in self._idx])
        self.total_tokens = int(self._token_starts[-1])
        self.num_docs = int(self._doc_starts[-1])
        self.split_dir, self._entries = split_dir, index["shards"]
        if verify:
            self.verify()

    def verify(self) -> int:
        """Check every shard file against the checksum index.json records; raise :class:`InputError`
        naming the first corrupted one. Returns the number of files checked."""
        checked = 0
        for entry in self._entries:
            for kind in ("bin", "idx"):
                expected = entry["checksums"][kind]
                path = self.split_dir / entry[kind]
                found = file_checksum(path)
                if found != expected:
                    raise InputError(
                        str(path),
                        f"corrupted: its {CHECKSUM} checksum is {found}, index.json records "
                        f"{expected}; run the tokenization again to rebuild it",
                    )
                checked += 1
        return checked

    def _open_bin(self, split_dir: Path, entry: dict) -> np.ndarray:
        path = split_dir / entry["bin"]
        if not path.is_file():
            raise InputError(str(path), "missing (listed in index.json)")
        size, expected = path.stat().st_size, entry["tokens"] * self.dtype.itemsize
        if size != expected:
            raise InputError(
                str(path), f"index says {entry['tokens']:,} tokens ({expected:,} bytes) but the file has {size:,} bytes"
            )
        if size == 0:  # mmap cannot map an empty file
            return np.empty(0, self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    @staticmethod
    def _open_idx(split_dir: Path, entry: dict) -> np.ndarray:
        path = split_dir / entry["idx"]
        try:
            offsets = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(str(path), f"unreadable document index ({exc})") from None
        if offsets.shape != (entry["docs"],):
            raise InputError(
                str(path), f"index says {entry['docs']:,} documents but the file has {offsets.size:,} offsets"
            )
        return offsets

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (global index over all shards), without its EOS."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range (0..{self.num_docs - 1})")
        shard = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        offsets, local = self._idx[shard], i - int(self._doc_starts[shard])
        stop = int(offsets[local + 1]) if local + 1 < len(offsets) else len(self._bins[shard])
        return np.asarray(self._bins[shard][int(offsets[local]) : stop - 1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the concatenation of all shards (may span shard boundaries)."""
        if not 0 <= start <= stop <= self.total_tokens:
            raise IndexError(f"slice {start}:{stop} outside 0:{self.total_tokens}")
        pieces = []
        shard = max(int(np.searchsorted(self._token_starts, start, side="right")) - 1, 0)
        while start < stop:
            base = int(self._token_starts[shard])
            end = min(stop, int(self._token_starts[shard + 1]))
            pieces.append(self._bins[shard][start - base : end - base])
            start, shard = end, shard + 1
        if len(pieces) == 1:
            return np.asarray(pieces[0])
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)
