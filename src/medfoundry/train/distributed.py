"""One process or many: the same training code under plain ``python`` or ``torchrun``.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (and the rendezvous for multi-node); this module starts the
process group (NCCL on GPU, gloo on CPU), wraps the model with DDP or FSDP2 (``fully_shard`` on every
transformer block, then the root), and gives the loop the few collectives it needs.

Under FSDP2 every parameter is a DTensor holding this process's shard. Checkpoints and the export
need whole tensors: :func:`full_model_state` / :func:`full_optim_state` gather them (collectives:
every process calls them, process 0 receives CPU tensors), and :func:`unsharded_copy` rebuilds a
plain model from them for the export.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from medfoundry.model import export
from medfoundry.train.accel import HiddenStatesLM


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


def unwrap(model: nn.Module) -> nn.Module:
    """The model a run trains, as transformers (or peft) made it: without the torch.compile, DDP and
    :class:`~medfoundry.train.accel.HiddenStatesLM` wrappers around it (FSDP2 wraps in place)."""
    model = export.unwrap(model)
    return model.lm if isinstance(model, HiddenStatesLM) else model


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

        # with the fused loss the model returns its final hidden states, a view: FSDP2 warns that an
        # in-place op on it would bypass its pre-backward hook; the loss only reads it
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
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


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded ``model`` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def tied_names(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every parameter name that repeats an earlier one (a tied output head)."""
    first, aliases = {}, {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """The whole state dict of an FSDP2-sharded model, on CPU. A collective: every process calls it;
    process 0 gets the tensors, the others an empty dict. Names of one shared parameter (a tied output
    head) share one tensor, as in ``model.state_dict()``, so a checkpoint stores it once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(unwrap(model), options=_full_options())
    if state:
        for alias, name in tied_names(model).items():
            if alias in state and name in state:
                state[alias] = state[name]
    return state


def full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state dict of an FSDP2-sharded model, on CPU, keyed by parameter names (the
    form of ``get_optimizer_state_dict``; :func:`medfoundry.train.checkpoint.optim_state_by_index` turns it
    into ``optimizer.state_dict()``'s). A collective, like :func:`full_model_state`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:  # no step taken yet: nothing to gather (and torch would take a zero step to make some)
        return optimizer.state_dict() if dist.get_rank() == 0 else {}
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_full_options())


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain CPU copy of an FSDP2-sharded transformers model, built from its config and the gathered
    weights, on process 0 (None on the others). A collective, like :func:`full_model_state`."""
    from transformers import AutoModelForCausalLM

    state = full_model_state(model)
    if not state:
        return None
    source = unwrap(model)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the RNG where it was
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(source.config), dtype=dtype)
    plain.load_state_dict(state, strict=True)
    if getattr(source, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(source.generation_config)
    return plain.eval()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def any_failed(d: Dist, failed: bool, device: str) -> bool:
    """Whether any process says ``failed``: a collective that is also a barrier, so that when one process
    cannot go on (process 0 could not write a checkpoint) all stop, instead of the others waiting for it
    at the next collective until a timeout."""
    if not d.enabled:
        return failed
    flag = torch.tensor([int(failed)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
