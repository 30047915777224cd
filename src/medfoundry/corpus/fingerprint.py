"""Document fingerprints for deduplication: an exact-text hash and a MinHash signature.

MinHash uses multiply-shift universal hashing, ``(a * h + b) >> 32`` on 64-bit shingle hashes
with wrap-around, which needs no modulo and vectorizes well; the signature is the per-permutation
minimum over all word shingles. Documents shorter than one shingle get a signature from their
whole word sequence, so short duplicates still collide.
"""

from __future__ import annotations

import numpy as np
import xxhash

from medfoundry.corpus.ngrams import ngram_hashes, words

_CHUNK = 4096  # shingles per block: bounds the (shingles x permutations) temporary to 4 MiB


class MinHasher:
    def __init__(self, num_perm: int, shingle_words: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm
        self.shingle_words = shingle_words

    def signature(self, word_hashes: np.ndarray) -> np.ndarray:
        shingles = ngram_hashes(word_hashes, min(self.shingle_words, max(len(word_hashes), 1)))
        if len(shingles) == 0:
            return np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        shingles = np.unique(shingles)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), _CHUNK):
                block = shingles[start : start + _CHUNK, None] * self.a + self.b
                np.minimum(sig, block.min(axis=0), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)


def exact_key(text: str) -> str:
    """Hash of the text with case, punctuation and whitespace differences removed."""
    return xxhash.xxh3_128_hexdigest(" ".join(words(text)).encode())


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(docs, bands) uint64 keys: documents sharing a key in any band are LSH candidates."""
    docs, perms = signatures.shape
    rows = perms // bands
    view = np.ascontiguousarray(signatures).reshape(docs, bands, rows)
    keys = np.zeros((docs, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            keys = keys * np.uint64(0x100000001B3) + view[:, :, r].astype(np.uint64)
        keys += np.arange(bands, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    return keys
