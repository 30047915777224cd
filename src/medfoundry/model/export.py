"""Write a trained model as a standard Hugging Face directory that ``from_pretrained`` loads offline.

The directory holds ``config.json``, ``model.safetensors`` (or shards of at most 5 GB with their index,
written one tensor at a time), ``generation_config.json`` and the
tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``chat_template.jinja``), and appears whole or not at all.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from medfoundry.errors import ConfigError
from medfoundry.io import atomic_dir, write_json
from medfoundry.model.presets import context_length
from medfoundry.model.safetensors_stream import Spec, write_sharded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_ID_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a ``torch.compile`` and/or DistributedDataParallel wrapper."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = getattr(model.module, "_orig_mod", model.module)
    return model


MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size


@dataclass
class Weights:
    """What an export writes: a model's config and generation config, its class name, and its tensors
    (a tied weight under its first name only), streamed in ``spec``'s order. ``tensors`` yields each
    whole tensor once: from a model in memory, gathered one parameter at a time from a sharded one,
    or read from a checkpoint (:func:`medfoundry.train.export`)."""

    config: object
    generation_config: object | None
    architecture: str
    spec: Spec
    tensors: Iterator[tuple[str, torch.Tensor]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> Weights:
        """The weights of a plain (unwrapped, unsharded) transformers model."""
        model = unwrap(model)
        state = _stored_once(model.state_dict())
        spec = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        return cls(
            model.config, getattr(model, "generation_config", None), type(model).__name__, spec, iter(state.items())
        )

    @classmethod
    def describing(cls, model: torch.nn.Module) -> Weights:
        """A model's description without its tensors: the export writes all but the weights."""
        model = unwrap(model)
        return cls(model.config, getattr(model, "generation_config", None), type(model).__name__, {}, iter(()))


def _stored_once(state: dict) -> dict:
    """A state dict with a tensor shared by several names (tied embeddings) kept under its first name."""
    kept, seen = {}, set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        kept[name] = tensor
    return kept


def export_hf(
    model,
    tokenizer_dir: Path | None,
    out_dir: Path,
    *,
    dtype: str = "float32",
    generation: dict | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Export ``model`` (a transformers model, or its :class:`Weights`) with the tokenizer of
    ``tokenizer_dir`` into ``out_dir``, floating-point weights cast to ``dtype``, one tensor at a time.

    The live model is not modified: each tensor is cast as it is written, so a model kept in float32
    (master weights) can be exported in bfloat16 mid-training. Special-token ids in the config and
    generation config are the tokenizer's; ``generation`` adds generation defaults (e.g. max_new_tokens).
    Weights with an empty ``spec`` write everything but the weights (a checkpoint's model description).
    """
    weights = model if isinstance(model, Weights) else Weights.of(model)
    cast_to = torch_dtype(dtype)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        ids = copy_tokenizer(Path(tokenizer_dir), tmp) if tokenizer_dir is not None else {}
        if weights.spec:
            spec = {name: (shape, cast_to if d.is_floating_point else d) for name, (shape, d) in weights.spec.items()}
            write_sharded(tmp, spec, weights.tensors, max_shard_bytes)
        config = copy.deepcopy(weights.config)
        config.update({**ids, "dtype": dtype, "architectures": [weights.architecture]})
        config.save_pretrained(tmp)
        if tokenizer_dir is not None:
            _set_tokenizer_context(tmp, context_length(config))
        generation_config = copy.deepcopy(weights.generation_config)
        if generation_config is None:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_model_config(config)
        generation_config.update(**ids, **(generation or {}))
        generation_config.save_pretrained(tmp)
    return out_dir


def copy_tokenizer(src: Path, dst: Path) -> dict:
    """Copy the tokenizer files (``tokenizer.json`` made from GPT-2's ``vocab.json`` + ``merges.txt`` when
    absent, GPT-2's special-token conventions when there is no ``tokenizer_config.json``) and return its
    special-token ids as loaded by ``AutoTokenizer``."""
    from medfoundry.model.load import load_backend_tokenizer, load_tokenizer

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    if not (dst / "tokenizer.json").is_file():
        load_backend_tokenizer(src).save(str(dst / "tokenizer.json"))
    if not (dst / "tokenizer_config.json").is_file():
        _write_gpt2_conventions(dst)
    tokenizer = load_tokenizer(dst)
    return {name: getattr(tokenizer, name) for name in _ID_NAMES if getattr(tokenizer, name) is not None}


def _set_tokenizer_context(directory: Path, context: int | None) -> None:
    """The tokenizer's ``model_max_length`` is the model's context: vLLM serves at the smaller of the two,
    so a tokenizer trained with a default limit must not cap a longer-context model."""
    path = directory / "tokenizer_config.json"
    if context is None or not path.is_file():
        return
    write_json(path, {**json.loads(path.read_text(encoding="utf-8")), "model_max_length": context})


def _write_gpt2_conventions(directory: Path) -> None:
    """GPT-2 has no tokenizer_config.json: ``<|endoftext|>`` is its bos, eos and unk token."""
    from tokenizers import Tokenizer

    special = {}
    if Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id("<|endoftext|>") is not None:
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    write_json(
        directory / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False},
    )
    write_json(directory / "special_tokens_map.json", special)
