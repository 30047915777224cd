"""The order in which training readers visit their items: seeded per-epoch permutations, resumable exactly.

The global order is an endless concatenation of per-epoch permutations of ``n_items`` items; rank r
reads global positions r, r+W, r+2W, ... . Every rank therefore advances by the same number of
global positions per batch, and the whole state is one counter (``position``: global positions
consumed by all ranks together), the same on every rank. Rank 0's state resumes any rank, and the
batch size and the number of ranks may change between runs (a checkpoint resharded from N to M
processes reads on from the same global position).
"""

from __future__ import annotations

import numpy as np

from medfoundry.errors import MedfoundryError


class ShuffledOrder:
    """Base of the pretraining and fine-tuning readers: which item each rank reads next.

    Subclasses name, in ``must_match``, the attributes a saved state must agree on, and turn the
    item indices of :meth:`next_items` into a batch.
    """

    must_match: tuple[str, ...] = ("seed", "n_items")
    mismatch_hint = ""  # appended to the error when a saved state does not fit

    def __init__(self, n_items: int, batch_size: int, *, rank: int, world_size: int, seed: int):
        if batch_size < 1:
            raise MedfoundryError(f"batch_size must be positive, not {batch_size}")
        if not 0 <= rank < world_size:
            raise MedfoundryError(f"rank must be in 0..{world_size - 1}, not {rank}")
        self.n_items, self.batch_size, self.rank, self.world_size, self.seed = (
            n_items,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.position = 0
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """Epoch of the next item this rank reads."""
        return (self.position + self.rank) // self.n_items

    @property
    def batches_per_epoch(self) -> float:
        return self.n_items / (self.batch_size * self.world_size)

    def __iter__(self):
        return self

    def next_items(self) -> list[int]:
        """Item indices of this rank's next batch; advances the shared position."""
        positions = self.position + self.rank + np.arange(self.batch_size, dtype=np.int64) * self.world_size
        self.position += self.batch_size * self.world_size
        return [self._item(int(p)) for p in positions]

    def _item(self, position: int) -> int:
        epoch, k = divmod(position, self.n_items)
        if epoch not in self._permutations:  # at most two epochs cached: a batch may straddle a boundary
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        return int(self._permutations[epoch][k])

    def state_dict(self) -> dict:
        state = {name: getattr(self, name) for name in self.must_match}
        return {
            **state,
            "position": self.position,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (rank, batch size and number of ranks may differ: ``position`` is global)."""
        for name in self.must_match:
            if state.get(name) != getattr(self, name):
                raise MedfoundryError(
                    f"reader state does not fit this reader: {name} is {state.get(name)!r} "
                    f"in the state but {getattr(self, name)!r} here{self.mismatch_hint}"
                )
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise MedfoundryError(f"reader state: position must be a non-negative integer, not {position!r}")
        self.position = position
