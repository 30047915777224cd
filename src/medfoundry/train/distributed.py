"""One process or many: the same training code under plain ``python`` or ``torchrun``.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (and the rendezvous for multi-node); this module starts the
process group (NCCL on GPU, gloo on CPU), wraps the model with DDP or FSDP2 (``fully_shard`` on every
transformer block, then the root), and gives the loop the few collectives it needs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str, device: str) -> Dist:
    """Join the process group when launched by torchrun; a no-op in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a transformers causal LM (GPT-2 ``h``, LLaMA ``layers``, BLOOM ``h``)."""
    for name in ("layers", "h"):
        for module in model.modules():
            blocks = getattr(module, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return list(blocks)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def wrap_model(model: nn.Module, strategy: str, device: str, d: Dist) -> nn.Module:
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [d.local_rank] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce_sum(value: float | int, d: Dist, device: str) -> float:
    if not d.enabled:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_true(flag: bool, d: Dist, device: str) -> bool:
    return all_reduce_sum(0 if flag else 1, d, device) == 0


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
