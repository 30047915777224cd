"""Speed-ups applied to the live model for training; none changes its weights, its config.json or its function.

- :func:`set_attention`: the attention kernel (``training.attention``), set on the model at run time
  (``config._attn_implementation`` is not serialized: the exported config.json has no trace of it).
- :func:`native_gelu`: transformers' Python tanh-GELU modules (``gelu_new`` of GPT-2, ``gelu_fast``,
  BLOOM's) replaced by one ``F.gelu(approximate="tanh")`` kernel computing the same function (the
  Python formula is five elementwise kernels forward and more backward, 8% of a gpt2-52m step on CPU;
  the native kernel takes about half as long).
- :func:`fuse_output_layer`: the output layer made to return its input, for the fused loss of
  :mod:`medfoundry.train.losses` (``training.loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfoundry.errors import ConfigError

# eager / sdpa time of a forward + backward pass through GPT-2 layers of gpt2-52m's width (bf16 autocast,
# Zen 5, the variants alternated): 2 threads, wall time, 4,096 tokens a pass: 0.86 at context 256, 0.91
# at 512, 1.03 at 1,024, 1.12 at 2,048; 1 thread, CPU time, ~2,048 tokens a pass: 0.88 at 256, 1.03 at
# 512, 1.28 at 768, 1.88 at 1,024.
SDPA_MIN_CONTEXT_CPU = 512


def attention_for(choice: str, device: str, context: int) -> str:
    """The kernel ``training.attention: auto`` stands for.

    On CPU, eager attention (two batched bf16 matmuls and a softmax) beats SDPA's flash kernel, which
    runs at ~150 GFLOP/s there, at short contexts: by 12-14% at 256. Eager computes and stores the
    full T x T scores, so its cost grows faster: at 512 the two are even, from 768 on SDPA wins (and
    uses less memory). So: eager below 512 on CPU, SDPA otherwise; on GPUs SDPA (flash /
    memory-efficient kernels) always.
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


class PassThroughLinear(nn.Linear):
    """An output layer that returns its input: the model's "logits" are then the final hidden states,
    and the loss applies the layer's weight itself. The module keeps its weight (same name, same
    tensor, tied or not), so the state dict, the optimizer groups, DDP and FSDP see no difference."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


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


def fuse_output_layer(model: nn.Module, choice: str) -> nn.Linear | None:
    """For ``training.loss`` chunked (or auto, where it fits): turn the output layer into a
    :class:`PassThroughLinear`, in place, and return it; None for the plain loss."""
    blocker = _fused_loss_blocker(model)
    if choice == "plain" or (choice == "auto" and blocker):
        return None
    if blocker:
        raise ConfigError(f"training.loss: chunked does not fit this model: {blocker}; use auto or plain")
    head = model.get_output_embeddings()
    head.__class__ = PassThroughLinear
    return head
