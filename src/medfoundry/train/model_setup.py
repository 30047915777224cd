"""Build the model a run trains: a preset or config from scratch, or an HF / GGUF checkpoint to continue."""

from __future__ import annotations

from pathlib import Path

import torch

from medfoundry.errors import ConfigError
from medfoundry.train.config import PretrainConfig


def build_model(cfg: PretrainConfig, tokenizer_size: int, base_dir: Path):
    """From scratch the vocabulary is the tokenizer's; continued, the checkpoint's (grown for an extended tokenizer)."""
    from transformers import AutoModelForCausalLM

    from medfoundry.model.load import hf_directory
    from medfoundry.model.presets import model_config
    from medfoundry.model.resize import resize_for_tokenizer

    if cfg.model.init_from:
        model = load_pretrained(cfg.model.init_from, base_dir, allow_pickle=cfg.model.allow_pickle)
    else:
        config = model_config(
            cfg.model.preset, vocab_size=tokenizer_size, context=cfg.model.context, overrides=cfg.model.overrides
        )
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)  # a user's config.json may name code
    resize_for_tokenizer(model, hf_directory(cfg.data.tokenizer_dir))
    check_context(model.config, cfg.model.context, "model.context")
    return model


def load_pretrained(init_from: str, base_dir: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """An HF checkpoint directory, or a GGUF file dequantized into ``base_dir``, as an fp32 model.

    The checkpoint is untrusted input: safetensors weights, pickled ones only with ``allow_pickle`` (and then
    through ``torch.load(weights_only=True)``), no code of its own unless ``trust_remote_code``
    (:func:`medfoundry.model.load.weights_policy`)."""
    from medfoundry.model.load import load_causal_lm, weights_policy

    source = Path(init_from)
    if source.suffix == ".gguf":
        source = _converted(source, base_dir)
    if not (source / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: {source} is not a Hugging Face checkpoint directory (no config.json) or a .gguf file"
        )
    policy = weights_policy(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return load_causal_lm(source, policy, dtype=torch.float32)


def _converted(gguf: Path, base_dir: Path) -> Path:
    """A GGUF model dequantized once into a normal HF directory beside the run (reused on resume)."""
    from medfoundry.model.convert import convert_gguf

    if not (base_dir / "model.safetensors").is_file():
        convert_gguf(gguf, base_dir)
    return base_dir


def check_context(config, context: int, field: str) -> None:
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ConfigError(f"{field} ({context}) exceeds the model's {limit} positions: lower {field}")


def check_vocab(model, shard_vocab: int, tokenizer_dir: str) -> None:
    size = model.get_input_embeddings().weight.shape[0]
    if shard_vocab > size:
        raise ConfigError(
            f"the token shards use a {shard_vocab:,}-token vocabulary but the model has {size:,} embeddings: "
            f"train from scratch with this tokenizer, or extend the model's tokenizer with "
            f"`medfoundry tokenizer extend` (data.tokenizer_dir is {tokenizer_dir})"
        )
