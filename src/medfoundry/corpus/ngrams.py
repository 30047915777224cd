"""Deterministic word n-gram hashing shared by decontamination and MinHash.

Words are the lower-cased ``\\w+`` runs of the NFKC-normalized text (so ligatures, full-width and
compatibility characters compare equal), hashed with xxh64: stable across processes and machines,
unlike Python's salted ``hash``. A per-process cache makes the hash of a frequent word a dict hit.
N-gram hashes are a polynomial rolling combination computed
with numpy in ``n`` vectorized passes, so a 10,000-word paper costs microseconds, not a Python
loop over tuples.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio)


_CACHE_MAX = 1 << 21


class _WordHashCache(dict):
    def __missing__(self, word: str) -> int:
        if len(self) >= _CACHE_MAX:
            self.clear()
        value = self[word] = xxhash.xxh64_intdigest(word.encode())
        return value


_CACHE = _WordHashCache()


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def word_hashes(text: str) -> np.ndarray:
    """uint64 hash of every word of ``text``, in order."""
    tokens = words(text)
    return np.fromiter(map(_CACHE.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of ``n`` consecutive words (empty when there are fewer)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    out = hashes[:count].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            out *= _MULT
            out += hashes[j : j + count]
    return out
