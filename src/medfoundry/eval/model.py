"""Load a causal LM for evaluation: a Hugging Face checkpoint directory or a GGUF file.

A GGUF file is dequantized once into a regular checkpoint in a cache directory (keyed on the file's
path, size and modification time), because transformers cannot run a GGUF model without first
building that checkpoint. Remote code is never run. The context window follows lm-eval's rule
(``n_positions``, ``max_position_embeddings``, ``n_ctx``, the tokenizer's ``model_max_length``,
else 2048) so that long inputs are cut at the same place as in lm-eval.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medfoundry.errors import ConfigError, InputError
from medfoundry.runtime import configure, resolve_device_precision

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's order
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer gives a length
_UNSET_TOKENIZER_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: "no limit recorded"


@dataclass
class LoadedModel:
    """A model ready for scoring, its weights in ``precision`` (bf16: bfloat16 weights, as lm-eval's
    ``dtype="bfloat16"``; measured faster on CPU than float32 weights under autocast, which casts every
    weight at every forward pass)."""

    model: torch.nn.Module
    tokenizer: "PreTrainedTokenizerFast"
    name: str
    path: Path
    precision: str
    device: str
    max_length: int

    def autocast(self):
        """bfloat16 autocast for bf16 runs (a no-op for fp32), for callers that feed float32 tensors
        (e.g. embeddings) to a bf16 model."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def load_model(path, *, precision: str = "auto", device: str = "auto", tokenizer=None, threads: int = 0,
               cache_dir: str | Path | None = None) -> LoadedModel:
    """Load ``path`` (checkpoint directory or ``.gguf`` file) in eval mode.

    ``tokenizer`` overrides the checkpoint's own: a directory, a ``.gguf`` file or a loaded fast
    tokenizer. ``cache_dir`` holds dequantized GGUF checkpoints (default ``$MEDFOUNDRY_CACHE`` or
    ``~/.cache/medfoundry``, subfolder ``gguf``).
    """
    from transformers import AutoModelForCausalLM

    configure(threads)
    device, resolved = resolve_device_precision(device, precision)
    if precision == "auto" and resolved not in ("bf16", "fp32"):  # fp16 on older GPUs: scores need fp32 there
        resolved = "fp32"
    if resolved not in ("bf16", "fp32"):
        raise ConfigError(f"precision {precision!r}: evaluation runs in 'bf16' or 'fp32' (or 'auto')")
    precision = resolved
    path = Path(path)
    directory = gguf_checkpoint(path, cache_dir) if path.suffix == ".gguf" else path
    check_checkpoint(directory, need_tokenizer=tokenizer is None)
    tok = load_tokenizer(directory if tokenizer is None else tokenizer)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True,
                                                 trust_remote_code=False)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, name=path.stem if path.suffix == ".gguf" else path.resolve().name,
                       path=path, precision=precision, device=device, max_length=context_window(model.config, tok))


def check_checkpoint(directory: Path, *, need_tokenizer: bool = True) -> None:
    """Name the missing piece before transformers fails with a message about the Hub."""
    if not directory.is_dir():
        raise InputError(str(directory), "model not found: expected a checkpoint directory or a .gguf file")
    if not (directory / "config.json").is_file():
        raise InputError(str(directory), "no config.json: not a Hugging Face checkpoint directory")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise InputError(str(directory), f"no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if need_tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(str(directory), f"no tokenizer: expected one of {', '.join(TOKENIZER_FILES)} "
                                         "(or pass a tokenizer explicitly)")


def load_tokenizer(source) -> "PreTrainedTokenizerFast":
    """A fast tokenizer from a directory, a ``.gguf`` file, or one already loaded.

    Scoring tokenizes whole batches in one call of the Rust tokenizer, so slow (Python)
    tokenizers are refused.
    """
    from transformers import AutoTokenizer

    from medfoundry.tokenizer.files import load_gguf_tokenizer

    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.suffix == ".gguf":
            tokenizer = load_gguf_tokenizer(source)
        elif not source.is_dir():
            raise InputError(str(source), "tokenizer not found: expected a directory or a .gguf file")
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    else:
        tokenizer = source
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer {type(tokenizer).__name__}: a fast (Rust) tokenizer is required")
    return tokenizer


def context_window(config, tokenizer) -> int:
    """lm-eval's ``resolve_max_length``: the first context field of the (text) config, else the
    tokenizer's ``model_max_length`` when it records one, else 2048."""
    config = getattr(config, "text_config", None) or config
    for field in CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if value is not None:
            return int(value)
    recorded = getattr(tokenizer, "model_max_length", None)
    return int(recorded) if recorded is not None and recorded < _UNSET_TOKENIZER_LENGTH else DEFAULT_MAX_LENGTH


def hf_directory(path: str | Path) -> Path:
    """A Hugging Face directory for a model or tokenizer path: the path itself, or for a ``.gguf`` file its
    dequantized checkpoint in the cache (so a GGUF works wherever a tokenizer or model directory does)."""
    path = Path(path)
    return gguf_checkpoint(path) if path.suffix == ".gguf" else path


def gguf_checkpoint(gguf_path: Path, cache_dir: str | Path | None = None) -> Path:
    """The dequantized checkpoint of a GGUF file, converted on first use.

    The key covers the file's resolved path, size and modification time, so a replaced file is
    converted again; ``convert_gguf`` writes the directory atomically, so an interrupted conversion
    never leaves a half-written checkpoint behind.
    """
    from medfoundry.model.convert import convert_gguf

    if not gguf_path.is_file():
        raise InputError(str(gguf_path), "GGUF file not found")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / "gguf" / f"{gguf_path.stem}-{key}"
    if not (out / "config.json").is_file():
        convert_gguf(gguf_path, out)
    return out


def cache_root() -> Path:
    """medfoundry's cache folder: ``$MEDFOUNDRY_CACHE``, else ``$XDG_CACHE_HOME/medfoundry`` or ``~/.cache/medfoundry``."""
    if os.environ.get("MEDFOUNDRY_CACHE"):
        return Path(os.environ["MEDFOUNDRY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medfoundry"
