"""Safetensors files written one tensor at a time, so an exporter holds one tensor, never the model.

``safetensors.torch.save_file`` takes a dict of every tensor at once; the format itself (an 8-byte
header length, a JSON header of names, dtypes, shapes and byte offsets, then the bytes in order) only
needs the shapes and dtypes up front. :func:`write_sharded` writes a model's tensors as Hugging Face
does: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at most
``max_shard_bytes`` with ``model.safetensors.index.json``. The files load with ``safetensors`` and
``from_pretrained`` like any other.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX = "model.safetensors.index.json"

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), in the order written


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def shard_plan(spec: Spec, max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most ``max_shard_bytes`` (a larger tensor gets a file of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in spec.items():
        n = nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _header(spec: Spec, names: list[str]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape, dtype = spec[name]
        end = offset + nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_sharded(
    directory: Path, spec: Spec, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> None:
    """Write ``tensors`` (yielded in ``spec``'s order, each of its shape; cast to its dtype) into
    ``directory`` as one safetensors file or shards with an index; every file is fsynced."""
    shards = shard_plan(spec, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    stream = iter(tensors)
    for file, names in zip(files, shards):
        header = _header(spec, names)
        with open(directory / file, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            for name in names:
                got, tensor = next(stream)
                shape, dtype = spec[name]
                if got != name or tuple(tensor.shape) != shape:
                    raise ValueError(f"{file}: expected {name} {list(shape)}, got {got} {list(tensor.shape)}")
                data = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
                fh.write(memoryview(data.view(torch.uint8).numpy()))
            fh.flush()
            os.fsync(fh.fileno())
    if len(files) > 1:
        total = sum(nbytes(*spec[name]) for name in spec)
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        (directory / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
            encoding="utf-8",
        )
