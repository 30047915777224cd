"""One process or many: the same training code under plain ``python`` or ``torchrun``.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (and the rendezvous for multi-node); this module starts the
process group (NCCL on GPU, gloo on CPU), wraps the model with DDP or FSDP2 (``fully_shard`` on every
transformer block, then the root), and gives the loop the few collectives it needs.

Under FSDP2 every parameter is a DTensor holding this process's shard. Checkpoints keep the shards
(:mod:`medfoundry.train.checkpoint`); the export gathers one tensor at a time
(:func:`gathered_weights`, :func:`export_on_main`).
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

from medfoundry.errors import FolderBusy
from medfoundry.io import folder_lock
from medfoundry.model import export
from medfoundry.train.accel import HiddenStatesLM, transformer_blocks


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


def shards_on_meta(strategy: str, d: Dist) -> bool:
    """Whether the run builds its model on the meta device and materializes only each process's shards
    (:mod:`medfoundry.train.materialize`): under FSDP2 with several processes."""
    return d.enabled and strategy == "fsdp"


def wrap_model(model: nn.Module, strategy: str, device: str, d: Dist, precision: str = "fp32") -> nn.Module:
    """DDP, or FSDP2's ``fully_shard`` on every transformer block then the root. Under FSDP2 in bf16 the
    all-gathered parameters are bf16 copies of the fp32 shards and gradients are reduce-scattered in
    fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``): half the all-gather traffic,
    fp32 master weights and optimizer."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # with the fused loss the model returns its final hidden states, a view: FSDP2 warns that an
        # in-place op on it would bypass its pre-backward hook; the loss only reads it
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
        )
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
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


def all_reduce_sums(values: list[float], d: Dist, device: str) -> list[float]:
    """Sums over processes of a few numbers, in one collective (float64)."""
    if not d.enabled:
        return values
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_(tensor: torch.Tensor, d: Dist) -> None:
    """Sum ``tensor`` over processes, in place (no host sync)."""
    if d.enabled:
        dist.all_reduce(tensor)


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
    process 0 gets the tensors, the others an empty dict. Only for small models (a LoRA run's merge):
    the export of a full model streams one tensor at a time (:func:`gathered_weights`)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(unwrap(model), options=_full_options())
    if state:
        for alias, name in tied_names(model).items():
            if alias in state and name in state:
                state[alias] = state[name]
    return state


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain CPU copy of an FSDP2-sharded transformers model, built from its config and the gathered
    weights, on process 0 (None on the others). A collective, like :func:`full_model_state`; for the
    LoRA merge only."""
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


def gathered_weights(model: nn.Module) -> export.Weights:
    """The :class:`~medfoundry.model.export.Weights` of a sharded model, each tensor gathered whole in
    turn (``full_tensor``: a collective per tensor, so every process must consume ``tensors`` to the
    end) and moved to the CPU: no process holds more than one whole parameter beyond its shards."""
    from torch.distributed.tensor import DTensor

    lm = unwrap(model)
    aliases = tied_names(lm)
    state = {name: t for name, t in lm.state_dict().items() if name not in aliases}

    def tensors():
        for name, tensor in state.items():
            yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()

    spec = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    return export.Weights(lm.config, getattr(lm, "generation_config", None), type(lm).__name__, spec, tensors())


def export_on_main(model: nn.Module, d: Dist, device: str, write) -> None:
    """``write(weights)`` on process 0 with the trained model's weights: a plain model's, or a sharded
    one's gathered a tensor at a time (every process takes part; a failure on process 0 stops all)."""
    if not is_sharded(model):
        if d.is_main:
            write(export.Weights.of(unwrap(model)))
        return
    weights = gathered_weights(model)
    error = None
    if d.is_main:
        try:
            write(weights)
        except Exception as exc:  # keep taking part in the gathers, then fail together
            error = exc
    for _ in weights.tensors:
        pass
    if any_failed(d, error is not None, device):
        raise error or RuntimeError("process 0 could not export the model (see its error)")


def broadcast_object(value, d: Dist):
    """Process 0's ``value`` on every process (a collective; picklable values)."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def folder_lock_of_job(folder, what: str, d: Dist):
    """The folder's lock (:func:`medfoundry.io.folder_lock`) for one job, whatever its number of processes:
    process 0 takes it and tells the others whether it got it, so the processes of a job never lock each
    other out, and a second job on the folder fails at once on every process, naming the holder."""
    with contextlib.ExitStack() as held:
        busy = None
        if d.is_main:
            try:
                held.enter_context(folder_lock(folder, what))
            except FolderBusy as exc:
                busy = exc
        busy = broadcast_object(busy, d)
        if busy is not None:
            raise busy
        yield


def gather_objects(value, d: Dist, to_all: bool = False) -> list:
    """Every process's ``value``, by rank: on process 0 (on all with ``to_all``; others get ``[]``)."""
    if not d.enabled:
        return [value]
    values = [None] * d.world_size
    if to_all:
        dist.all_gather_object(values, value)
        return values
    dist.gather_object(value, values if d.is_main else None, dst=0)
    return values if d.is_main else []


def new_group(d: Dist):
    """A gloo process group of its own, for collectives in a background thread (asynchronous
    checkpoints), so that they never interleave with the training's; None in a single process."""
    return dist.new_group(backend="gloo") if d.enabled else None


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
