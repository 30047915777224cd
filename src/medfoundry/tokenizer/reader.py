"""The training data reader: shuffled fixed-length windows over token shards, resumable exactly.

Window k covers tokens ``k*seq_len : k*seq_len + seq_len + 1`` (inputs plus the shifted targets,
so consecutive windows share one token). The global order is an endless concatenation of seeded
per-epoch permutations; rank r reads global positions r, r+W, r+2W, ... . Every rank therefore
advances by the same number of global positions per batch, and the whole state is one counter
(``position``: global positions consumed by all ranks together), the same on every rank.
"""

from __future__ import annotations

import numpy as np

from medfoundry.errors import MedfoundryError
from medfoundry.tokenizer.shards import TokenShards

_MUST_MATCH = ("seq_len", "world_size", "n_windows", "seed")


class WindowReader:
    """Iterate over batches of windows: each batch is an int64 array of shape (batch_size, seq_len + 1)."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if seq_len < 1 or batch_size < 1:
            raise MedfoundryError(f"seq_len and batch_size must be positive, not {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise MedfoundryError(f"rank must be in 0..{world_size - 1}, not {rank}")
        self.n_windows = (shards.total_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise MedfoundryError(f"too little data: {shards.total_tokens:,} tokens, but one window of "
                                  f"seq_len {seq_len:,} needs {seq_len + 1:,}")
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.position = 0
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """Epoch of the next window this rank reads."""
        return (self.position + self.rank) // self.n_windows

    @property
    def batches_per_epoch(self) -> float:
        return self.n_windows / (self.batch_size * self.world_size)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        steps = np.arange(self.batch_size, dtype=np.int64)
        positions = self.position + self.rank + steps * self.world_size
        self.position += self.batch_size * self.world_size
        return np.stack([self._window(int(p)) for p in positions])

    def _window(self, position: int) -> np.ndarray:
        epoch, k = divmod(position, self.n_windows)
        start = int(self._permutation(epoch)[k]) * self.seq_len
        return self.shards.slice(start, start + self.seq_len + 1).astype(np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch``; at most two epochs are cached (a batch may straddle a boundary)."""
        if epoch not in self._permutations:
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._permutations[epoch]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "rank": self.rank, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. Its rank and batch_size may differ: ``position`` counts windows,
        and it is the same on every rank, so rank 0's state resumes any rank exactly."""
        for field in _MUST_MATCH:
            if state.get(field) != getattr(self, field):
                raise MedfoundryError(f"reader state does not fit this reader: {field} is {state.get(field)!r} "
                                      f"in the state but {getattr(self, field)!r} here")
        position = state.get("position")
        if not isinstance(position, int) or position < 0 or position % self.world_size:
            raise MedfoundryError(f"reader state: position must be a non-negative multiple of world_size "
                                  f"{self.world_size}, not {position!r}")
        self.position = position
