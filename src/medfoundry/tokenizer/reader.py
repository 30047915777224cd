"""The training data reader: shuffled fixed-length windows over token shards, resumable exactly.

Window k covers tokens ``k*seq_len : k*seq_len + seq_len + 1`` (inputs plus the shifted targets,
so consecutive windows share one token). The order of windows, and the
one-counter resumable state, come from :class:`~medfoundry.shuffled_order.ShuffledOrder`.
"""

from __future__ import annotations

import numpy as np

from medfoundry.errors import MedfoundryError
from medfoundry.shuffled_order import ShuffledOrder
from medfoundry.tokenizer.token_shards import TokenShards


class WindowReader(ShuffledOrder):
    """Iterate over batches of windows: each batch is an int64 array of shape (batch_size, seq_len + 1)."""

    must_match = ("seq_len", "n_windows", "seed")

    def __init__(
        self, shards: TokenShards, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0
    ):
        if seq_len < 1:
            raise MedfoundryError(f"seq_len must be positive, not {seq_len}")
        n_windows = (shards.total_tokens - 1) // seq_len
        if n_windows < 1:
            raise MedfoundryError(
                f"too little data: {shards.total_tokens:,} tokens, but one window of "
                f"seq_len {seq_len:,} needs {seq_len + 1:,}"
            )
        super().__init__(n_windows, batch_size, rank=rank, world_size=world_size, seed=seed)
        self.shards, self.seq_len = shards, seq_len

    @property
    def n_windows(self) -> int:
        return self.n_items

    def __next__(self) -> np.ndarray:
        return np.stack([self._window(k) for k in self.next_items()])

    def _window(self, k: int) -> np.ndarray:
        start = k * self.seq_len
        return self.shards.slice(start, start + self.seq_len + 1).astype(np.int64)
