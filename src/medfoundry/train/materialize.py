"""A model built on the meta device and materialized shard by shard under FSDP2: no process ever holds
the whole model.

:func:`meta_model` builds the architecture with no storage; ``fully_shard`` then splits every parameter
(:func:`medfoundry.train.distributed.wrap_model`); :func:`materialize` allocates each process's shards
only and fills them: from scratch with the architecture's own initialization (transformers'
``init_weights``, which also recomputes the non-persistent buffers such as rotary frequencies), or,
continuing from a Hugging Face checkpoint (or the safetensors conversion of a GGUF file), by reading
each process's rows straight from the safetensors files (:class:`_RowReader`). Rows a grown
vocabulary adds beyond the checkpoint's are the mean of its rows, as
:func:`medfoundry.model.resize.grow_embeddings` does for a model in memory.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import nn

from medfoundry.errors import ConfigError, InputError
from medfoundry.train import distributed

_ROWS = 4096  # rows read at a time when averaging a checkpoint's embedding


def meta_model(config) -> nn.Module:
    """The causal LM of ``config`` on the meta device (no storage, no initialization yet)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def materialize(model: nn.Module, device: str, *, source: Path | None, seed: int, d: distributed.Dist) -> None:
    """Allocate this process's shards of the sharded meta ``model`` (the Hugging Face model, or a
    wrapper around it) on ``device`` and fill them: from the safetensors checkpoint folder ``source``,
    or initialized from scratch (a per-process seed, so the shards differ; the global RNG state is
    left as it was)."""
    model.to_empty(device=device)
    lm = distributed.unwrap(model)
    with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
        torch.manual_seed(seed * 1_000_003 + d.rank)
        lm.init_weights()  # also the buffers (rotary frequencies); overwritten below when loading
    if source is not None:
        load_shards(lm, source)


def _files(source: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a checkpoint folder (one file or an index of shards)."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(str(index), f"not a safetensors index ({exc})") from None
        return {name: source / file for name, file in weight_map.items()}
    single = source / "model.safetensors"
    if not single.is_file():
        raise ConfigError(
            f"{source}: FSDP loads each process's shard from safetensors files, and this checkpoint has none "
            "(convert it to safetensors first, e.g. by loading and saving it with transformers)"
        )
    return dict.fromkeys(_RowReader(single).tensors, single)


_STORED = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _RowReader:
    """Rows of the tensors of one safetensors file, read with ``readinto`` at their offsets.

    ``safetensors``' own reader maps the whole file into the process: every page a process touches
    counts in its resident memory while the file is open. Reading a process's rows with plain reads
    into its shard (the page cache keeps them, outside any process) keeps its memory at its shard."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise InputError(str(path), f"not a safetensors file ({exc})") from None
        self.start = 8 + length
        self.tensors = {name: meta for name, meta in header.items() if name != "__metadata__"}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def rows(self, name: str, first: int, out: torch.Tensor) -> None:
        """Rows ``first .. first + len(out)`` of tensor ``name`` into ``out`` (cast to its dtype)."""
        meta = self.tensors[name]
        stored = _STORED.get(meta["dtype"])
        if stored is None:
            raise InputError(f"{self.path}: {name}", f"unsupported dtype {meta['dtype']}")
        shape = self.shape(name)
        row_bytes = math.prod(shape[1:]) * stored.itemsize if shape else stored.itemsize
        target = out if out.dtype == stored and out.is_contiguous() and out.device.type == "cpu" else None
        buffer = target if target is not None else torch.empty(out.shape, dtype=stored)
        with open(self.path, "rb") as fh:
            fh.seek(self.start + meta["data_offsets"][0] + first * row_bytes)
            view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
            if fh.readinto(view) != len(view):
                raise InputError(f"{self.path}: {name}", "the file ends inside the tensor (truncated)")
        if target is None:
            out.copy_(buffer)


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local tensor of a (sharded) parameter and the global index of its first row."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), offset[0] if offset else 0


@torch.no_grad()
def load_shards(lm: nn.Module, source: Path) -> None:
    """Fill every parameter and persistent buffer of ``lm`` (sharded by rows, FSDP2's ``Shard(0)``, or
    whole) with this process's rows of the checkpoint at ``source``."""
    files = _files(source)
    aliases = distributed.tied_names(lm)
    prefix = f"{lm.base_model_prefix}." if getattr(lm, "base_model_prefix", "") else ""
    readers: dict[Path, _RowReader] = {}
    for name, tensor in lm.state_dict().items():
        if name in aliases:
            continue
        stored = name if name in files else name.removeprefix(prefix)
        if stored not in files:
            raise InputError(str(source), f"the checkpoint has no tensor {name!r} for this model")
        file = files[stored]
        if file not in readers:
            readers[file] = _RowReader(file)
        _fill(tensor, readers[file], stored)


def _fill(tensor: torch.Tensor, reader: _RowReader, name: str) -> None:
    """Copy this process's rows of the stored tensor into ``tensor`` (a parameter's shard or a whole one)."""
    local, first = _local_rows(tensor)
    shape, global_shape = reader.shape(name), tuple(tensor.shape)
    if shape[1:] != global_shape[1:] or len(shape) != len(global_shape) or (shape and shape[0] > global_shape[0]):
        raise InputError(
            f"{reader.path}: {name}", f"shape {list(shape)} in the checkpoint, {list(global_shape)} in the model"
        )
    if local.numel() == 0:
        return
    if not shape:
        reader.rows(name, 0, local)
        return
    rows = local.shape[0]
    have = max(0, min(rows, shape[0] - first))
    if have:
        reader.rows(name, first, local[:have])
    if have < rows:  # rows of a vocabulary grown beyond the checkpoint's: the mean of its rows
        local[have:] = _row_mean(reader, name, shape).to(local.dtype)


def _row_mean(reader: _RowReader, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    total = torch.zeros(shape[1:], dtype=torch.float32)
    for start in range(0, shape[0], _ROWS):
        part = torch.empty((min(shape[0], start + _ROWS) - start, *shape[1:]), dtype=torch.float32)
        reader.rows(name, start, part)
        total += part.sum(dim=0)
    return total / shape[0]
