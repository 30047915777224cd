"""Learning-rate schedules: linear warmup, then cosine, linear, warmup-stable-decay or constant.

``step`` is the 0-based index of the optimizer step about to be taken. Warmup runs the first
``warmup_steps`` steps at ``base_lr * (step + 1) / warmup_steps`` (so the last warmup step is at
``base_lr``). A decay phase covers steps ``a .. total_steps - 1``: it is at ``base_lr`` on step ``a``
and reaches ``min_lr = base_lr * min_lr_ratio`` on the last step, ``total_steps - 1``; later steps stay
at ``min_lr``. Cosine and linear decay start right after warmup; ``wsd`` holds ``base_lr`` and decays
over the final ``decay_fraction`` of all steps, linearly or with the ``1-sqrt`` shape
(``1 - sqrt(progress)``, Hägele et al. 2024). ``constant`` stays at ``base_lr`` after warmup.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from medfoundry.config import StrictModel
from medfoundry.errors import ConfigError


class ScheduleConfig(StrictModel):
    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from base_lr / warmup_steps to base_lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of optim.lr")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: final fraction of all steps spent decaying")
    decay_shape: Literal["linear", "1-sqrt"] = Field("linear", description="wsd: shape of the decay")


def lr_at(step: int, base_lr: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps`` steps."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return base_lr
    min_lr = base_lr * cfg.min_lr_ratio
    if cfg.kind == "wsd":
        start = max(cfg.warmup_steps, total_steps - max(1, round(cfg.decay_fraction * total_steps)))
    else:
        start = cfg.warmup_steps
    progress = min(1.0, max(0.0, (step - start) / max(1, total_steps - 1 - start)))
    if cfg.kind == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.kind == "wsd" and cfg.decay_shape == "1-sqrt":
        factor = 1 - math.sqrt(progress)
    else:
        factor = 1 - progress
    return min_lr + (base_lr - min_lr) * factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR scaling every group's lr by ``lr_at(step, 1, ...)``; call ``scheduler.step()`` once per optimizer
    step. Its state_dict holds the step counter (the lambda itself is rebuilt from the config)."""
    if cfg.kind != "constant" and cfg.warmup_steps >= total_steps:
        raise ConfigError(
            f"schedule.warmup_steps ({cfg.warmup_steps}) must be smaller than the number of steps "
            f"({total_steps}) to leave room for the {cfg.kind} decay"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, 1.0, total_steps, cfg))
