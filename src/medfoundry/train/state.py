"""Where a training run is: the typed state a checkpoint carries besides the weights and the optimizer."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import numpy as np
import torch

from medfoundry.errors import MedfoundryError


class Stateful(Protocol):
    """An object a checkpoint saves and restores (a data reader, an optimizer, a scheduler...)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def get_rng_state() -> dict:
    """Python ``random``, NumPy global, torch CPU and (when present) CUDA generator states."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


@dataclass
class TrainState:
    """The loop's counters, and the data reader's position and the RNG states as of the last save or
    restore (:class:`medfoundry.train.checkpoint.Checkpointer` fills these two in: they live in the
    reader and in the generators while training runs). Everything the next step depends on, besides
    the weights, the optimizer and the schedule."""

    step: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens processed, all processes together
    targets: int = 0  # tokens that carried loss
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    skipped_in_a_row: int = 0
    reader_state: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict, compare=False, repr=False)

    def record_step(self, tokens: float, targets: float, finite: bool) -> None:
        """Count one optimizer step (skipped unless ``finite``)."""
        self.step += 1
        self.tokens += int(tokens)
        self.targets += int(targets)
        self.skipped += not finite
        self.skipped_in_a_row = 0 if finite else self.skipped_in_a_row + 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(self)}
        if set(state) != names:
            raise MedfoundryError(f"training state: expected the fields {sorted(names)}, got {sorted(state)}")
        for name in names:
            setattr(self, name, state[name])
