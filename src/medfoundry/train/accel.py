"""Speed-ups applied to the live model for training; none changes its weights, its config.json or its function.

- :func:`set_attention`: the attention kernel (``training.attention``), set on the model at run time
  (``config._attn_implementation`` is not serialized: the exported config.json has no trace of it).
- :func:`native_gelu`: transformers' Python tanh-GELU modules (``gelu_new`` of GPT-2, ``gelu_fast``,
  BLOOM's) replaced by one ``F.gelu(approximate="tanh")`` kernel computing the same function (the
  Python formula is five elementwise kernels forward and more backward).
- :func:`fused_head` and :class:`HiddenStatesLM`: the model run without its output layer, which the
  fused loss of :mod:`medfoundry.train.losses` applies itself (``training.loss``).

Measured timings behind these choices: docs/training-speed.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfoundry.errors import ConfigError

# from this context on, SDPA beats eager attention on CPU (docs/training-speed.md)
SDPA_MIN_CONTEXT_CPU = 512


def attention_for(choice: str, device: str, context: int) -> str:
    """The kernel ``training.attention: auto`` stands for.

    On CPU, eager attention (two batched bf16 matmuls and a softmax) beats SDPA's flash kernel, which
    is slow there, at short contexts. Eager computes and stores the full T x T scores, so its cost
    grows faster: from :data:`SDPA_MIN_CONTEXT_CPU` on SDPA wins (and uses less memory). So: eager
    below it on CPU, SDPA otherwise; on GPUs SDPA (flash / memory-efficient kernels) always.
    """
    if choice != "auto":
        return choice
    return "eager" if device == "cpu" and context < SDPA_MIN_CONTEXT_CPU else "sdpa"


def set_attention(model: nn.Module, choice: str, device: str, context: int) -> str:
    """Switch the model's attention kernel; returns the one in use. Models that do not take a choice
    (BLOOM: its own ALiBi attention, an eager one) keep theirs under ``auto``."""
    wanted = attention_for(choice, device, context)
    current = model.config._attn_implementation
    if wanted == current:
        return current
    if not model._can_set_attn_implementation():
        if choice == "auto":
            return current
        raise ConfigError(
            f"training.attention: {type(model).__name__} has only its own {current!r} attention; use auto"
        )
    model.set_attn_implementation(wanted)
    return wanted


class TanhGELU(nn.Module):
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` in one native kernel (forward and backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def _tanh_gelu_classes() -> tuple[type, ...]:
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
    from transformers.models.bloom.modeling_bloom import BloomGelu

    return NewGELUActivation, FastGELUActivation, GELUTanh, BloomGelu


def native_gelu(model: nn.Module) -> int:
    """Replace every tanh-approximation GELU module with :class:`TanhGELU`; returns how many.
    They hold no parameters, so the state dict and the exported model are unchanged."""
    classes, replaced = _tanh_gelu_classes(), 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, classes):
                setattr(parent, name, TanhGELU())
                replaced += 1
    return replaced


# model types whose causal-LM forward returns ``lm_head(hidden_states)`` as the logits, untouched
FUSED_LOSS_MODEL_TYPES = ("gpt2", "llama", "bloom")


def _fused_loss_blocker(model: nn.Module) -> str | None:
    """None when the fused loss fits the model, else why not."""
    head = model.get_output_embeddings()
    if model.config.model_type not in FUSED_LOSS_MODEL_TYPES:
        return f"model type {model.config.model_type!r} (supported: {', '.join(FUSED_LOSS_MODEL_TYPES)})"
    if type(head) is not nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain Linear"
    if head.bias is not None:
        return "its output layer has a bias"
    return None


def fused_head(model: nn.Module, choice: str) -> nn.Linear | None:
    """The output layer the fused loss applies, for ``training.loss`` chunked (or auto, where it fits);
    None for the plain loss. The model is not changed: :class:`HiddenStatesLM` runs it without that layer."""
    blocker = _fused_loss_blocker(model)
    if choice == "plain" or (choice == "auto" and blocker):
        return None
    if blocker:
        raise ConfigError(f"training.loss: chunked does not fit this model: {blocker}; use auto or plain")
    return model.get_output_embeddings()


class HiddenStatesLM(nn.Module):
    """A causal LM (a transformers model, or a peft one around it) run without its output layer, for a
    loss that applies the layer itself: ``forward`` returns the final hidden states [batch, positions,
    hidden size], never logits. The LM inside is untouched (its own ``forward`` returns logits): DDP,
    FSDP2 and torch.compile wrap this module, and :func:`medfoundry.train.distributed.unwrap` gives the
    LM back for checkpoints and the export. The output layer keeps its weight (same name, same tensor,
    tied or not), so the state dict and the optimizer groups do not change."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        hf_model = self.lm.get_base_model() if hasattr(self.lm, "peft_config") else self.lm
        return hf_model.base_model(**inputs).last_hidden_state  # the decoder stack, final norm included
