"""The model a run trains: built (a preset or config from scratch, or an HF / GGUF checkpoint to continue)
and prepared for training the same way by pretraining, fine-tuning and the planner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medfoundry.errors import ConfigError
from medfoundry.train.accel import HiddenStatesLM, compile_blocks, compile_for, fused_head, native_gelu, set_attention
from medfoundry.train.config import PretrainConfig, TrainingConfig
from medfoundry.train.lora import LoraSettings, add_adapters
from medfoundry.train.materialize import meta_model


def build_model(cfg: PretrainConfig, tokenizer_size: int, *, meta: bool = False) -> nn.Module:
    """From scratch the vocabulary is the tokenizer's; continued, the checkpoint's (grown for an extended
    tokenizer). With ``meta`` the model has no storage yet (:mod:`medfoundry.train.materialize` fills
    each process's shards after sharding)."""
    from transformers import AutoModelForCausalLM

    from medfoundry.model.load import tokenizer_directory
    from medfoundry.model.presets import model_config
    from medfoundry.model.resize import resize_for_tokenizer

    if cfg.model.init_from and meta:
        model = meta_model(pretrained_config(cfg.model.init_from, allow_pickle=cfg.model.allow_pickle))
    elif cfg.model.init_from:
        model = load_pretrained(cfg.model.init_from, allow_pickle=cfg.model.allow_pickle)
    else:
        config = model_config(
            cfg.model.preset, vocab_size=tokenizer_size, context=cfg.model.context, overrides=cfg.model.overrides
        )
        # a user's config.json may name code: trust_remote_code=False
        model = meta_model(config) if meta else AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    resize_for_tokenizer(model, tokenizer_directory(cfg.data.tokenizer_dir))
    check_context(model.config, cfg.model.context, "model.context")
    return model


def pretrained_source(init_from: str, *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """The Hugging Face folder of ``init_from`` (a GGUF file's conversion, a Hub id's snapshot) and the keyword
    arguments its weights load with (:func:`medfoundry.model.load.weights_policy`)."""
    from medfoundry.model.load import hf_directory, weights_policy

    source = hf_directory(init_from, allow_pickle=allow_pickle)
    if not (source / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: {source} is not a Hugging Face checkpoint directory (no config.json), a .gguf file "
            "nor a Hub id (org/name[@revision])"
        )
    return source, weights_policy(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def pretrained_config(init_from: str, *, allow_pickle: bool = False):
    """The model config of ``init_from``, checked as :func:`load_pretrained` checks the checkpoint."""
    from transformers import AutoConfig

    source, _ = pretrained_source(init_from, allow_pickle=allow_pickle)
    return AutoConfig.from_pretrained(str(source), trust_remote_code=False)


def load_pretrained(init_from: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """An HF checkpoint directory, or a GGUF file (dequantized once into the shared cache of
    :func:`medfoundry.model.load.hf_directory`, keyed on the file), as an fp32 model.

    The checkpoint is untrusted input: safetensors weights, pickled ones only with ``allow_pickle`` (and then
    through ``torch.load(weights_only=True)``), no code of its own unless ``trust_remote_code``
    (:func:`medfoundry.model.load.weights_policy`)."""
    from medfoundry.model.load import load_causal_lm

    source, policy = pretrained_source(init_from, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return load_causal_lm(source, policy, dtype=torch.float32)


def check_context(config, context: int, field: str) -> None:
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ConfigError(f"{field} ({context}) exceeds the model's {limit} positions: lower {field}")


def check_vocab(model: nn.Module, shard_vocab: int, tokenizer_dir: str) -> None:
    size = model.get_input_embeddings().weight.shape[0]
    if shard_vocab > size:
        raise ConfigError(
            f"the token shards use a {shard_vocab:,}-token vocabulary but the model has {size:,} embeddings: "
            f"train from scratch with this tokenizer, or extend the model's tokenizer with "
            f"`medfoundry tokenizer extend` (data.tokenizer_dir is {tokenizer_dir})"
        )


@dataclass
class TrainingModel:
    """A model prepared for training."""

    lm: nn.Module  # the causal LM (peft's under LoRA): its forward returns logits; checkpoints and the export see it
    model: nn.Module  # what the loss calls, to wrap for the distributed strategy: the LM or a HiddenStatesLM around it
    head: nn.Linear | None  # the output layer the fused loss applies; None: the plain loss on the logits
    kernels: dict[str, str]  # for run.json: the attention kernel, the loss and what torch.compile compiles


def prepare_for_training(
    model: nn.Module,
    training: TrainingConfig,
    *,
    device: str,
    context: int,
    lora: LoraSettings | None = None,
    added_ids: Sequence[int] = (),
    place: bool = True,
) -> TrainingModel:
    """Prepare a freshly built model for training: the attention kernel for ``device`` and ``context``, the
    native GELU, the output layer fused with the loss (``training.loss``), LoRA adapters (and trainable
    rows for the tokens of ``added_ids``) under ``lora``, the model moved to ``device`` (unless not
    ``place``: the planner's meta model), activation checkpointing, and the transformer blocks compiled in
    place (``training.compile``: blocks, or auto where it pays). Distributed wrapping comes after
    (:func:`medfoundry.train.distributed.wrap_model`, on ``.model``); compiling the whole model (``model``)
    is the training loop's, around that wrapper."""
    attention = set_attention(model, training.attention, device, context)
    native_gelu(model)
    head = fused_head(model, _loss_choice(training.loss, lora, added_ids))
    if lora is not None:
        model = add_adapters(model, lora, added_ids)
    if place:
        model.to(device)
    if training.activation_checkpointing:
        model.activation_checkpointing_enable()
        if lora is not None:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need input grads
    compiled = compile_for(
        training.compile, device, lora=lora is not None, run_flops=_run_flops(model, training, context)
    )
    if compiled == "blocks":
        compile_blocks(model)
    return TrainingModel(
        lm=model,
        model=model if head is None else HiddenStatesLM(model),
        head=head,
        kernels={"attention": attention, "loss": "plain" if head is None else "chunked", "compile": compiled},
    )


def _run_flops(model: nn.Module, training: TrainingConfig, context: int) -> float:
    """Model FLOPs of the whole run, every sequence counted at full ``context``: what ``training.compile: auto``
    weighs against the compile time. 0 for a fine-tune whose steps the planner has not resolved from epochs."""
    from medfoundry.model.presets import flops_per_token

    steps = training.steps or 0
    return steps * training.global_batch_size * context * flops_per_token(model.config, context)


def _loss_choice(choice: str, lora: LoraSettings | None, added_ids: Sequence[int]) -> str:
    """LoRA with added tokens trains their rows through peft's wrappers of the embedding and output
    layers, which the fused loss (reading the output weight directly) would bypass: the plain loss."""
    if lora is None or not added_ids:
        return choice
    if choice == "chunked":
        raise ConfigError(
            "training.loss: chunked cannot train the tokens the template added under LoRA "
            "(they train through peft's wrappers): use auto or plain"
        )
    return "plain"
