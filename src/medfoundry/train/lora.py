"""LoRA adapters (peft) for fine-tuning on small GPUs, and merging them back into a plain checkpoint.

Only the adapters train (and, when the chat template added tokens, those tokens' embedding rows,
through peft's ``trainable_token_indices``: new tokens must be learned, and training the whole
embedding matrix would defeat the purpose). The optimizer sees only trainable parameters
(:func:`medfoundry.train.optim.param_groups` leaves frozen ones out). The export merges the
adapters into the weights, so ``model/`` loads in transformers, lm-eval and vLLM without peft;
``adapter/`` keeps the adapter alone (with the tokenizer) for peft users.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from torch import nn

from medfoundry.errors import ConfigError
from medfoundry.extras import require
from medfoundry.io import atomic_dir


class LoraSettings(Protocol):
    """The adapters' shape (fine-tuning's ``lora`` section, :class:`medfoundry.sft.config.LoraConfig`)."""

    r: int
    alpha: float
    dropout: float
    target_modules: str | list[str]


def _peft():
    return require("peft", "lora")


def add_adapters(model: nn.Module, cfg: LoraSettings, added_ids: Sequence[int]) -> nn.Module:
    """``model`` wrapped with LoRA adapters; everything else frozen (but the rows of ``added_ids``)."""
    peft = _peft()
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        trainable_token_indices=_token_rows(model, added_ids),
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found
        raise ConfigError(f"lora: {exc}") from None


def _token_rows(model: nn.Module, added_ids: Sequence[int]) -> dict | None:
    """peft's ``trainable_token_indices``: the added rows of the embeddings, and of an untied output
    layer (a tied one follows the embeddings)."""
    if not added_ids:
        return None
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {_module_name(model, embeddings): list(added_ids)}
    if head is not None and head.weight is not embeddings.weight:
        rows[_module_name(model, head)] = list(added_ids)
    return rows


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module)


def describe(model: nn.Module) -> dict:
    """Trainable and total parameter counts, for run.json."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total}


def save_adapter(model: nn.Module, directory: Path, tokenizer_dir: Path) -> None:
    """The adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer, written whole."""
    from medfoundry.model.export import copy_tokenizer

    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp))
        copy_tokenizer(Path(tokenizer_dir), tmp)


def merged(model: nn.Module) -> nn.Module:
    """The base model with the adapters folded into its weights (in place: the last use of the model)."""
    return model.merge_and_unload()
