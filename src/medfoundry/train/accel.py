"""Speed-ups applied to the live model for training; none changes its weights, its config.json or its function.

- :func:`set_attention`: the attention kernel (``training.attention``), set on the model at run time
  (``config._attn_implementation`` is not serialized: the exported config.json has no trace of it).
- :func:`native_gelu`: transformers' Python tanh-GELU modules (``gelu_new`` of GPT-2, ``gelu_fast``,
  BLOOM's) replaced by one ``F.gelu(approximate="tanh")`` kernel computing the same function (the
  Python formula is five elementwise kernels forward and more backward).
- :func:`fused_head` and :class:`HiddenStatesLM`: the model run without its output layer, which the
  fused loss of :mod:`medfoundry.train.losses` applies itself (``training.loss``).
- :func:`compile_for` and :func:`compile_blocks`: ``torch.compile`` of each transformer block, in place
  (``training.compile``), as torchtitan compiles per block: one graph, compiled once and reused by every
  block, that fuses the elementwise work between the matmuls (norms, GELU, residual adds, dropout,
  attention's softmax and masking) forward and backward.

Measured timings behind these choices: docs/training-speed.md.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from medfoundry.errors import ConfigError

# from this context on, SDPA beats eager attention on CPU (docs/training-speed.md)
SDPA_MIN_CONTEXT_CPU = 512
TWO_SQRT_2_OVER_PI = 2 * (2 / math.pi) ** 0.5  # TanhGELU's compiled form


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
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` in one native kernel (forward and backward).

    Compiled, the same function is written ``x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))`` (as ``0.5 (1 + tanh z)
    = sigmoid(2z)``) for Inductor to fuse: its vectorized sigmoid costs less than half its tanh, which on a CPU
    made a compiled GELU forward 1.8 instead of 4.4 ms and backward 2.7 instead of 5.0 for 2,048 x 2,048 bf16
    (2 Zen 4 cores; gpt2-52m has 12 such per step). The two forms differ by at most 5e-7 in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
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
        # no KV cache: training never reads it, and filling one is a graph break in every compiled block
        return hf_model.base_model(use_cache=False, **inputs).last_hidden_state  # final norm included


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a transformers causal LM (GPT-2 ``h``, LLaMA ``layers``, BLOOM ``h``)."""
    for name in ("layers", "h"):
        for module in model.modules():
            blocks = getattr(module, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return list(blocks)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


# training.compile: auto compiles only a run that lasts at least this long on the fastest device of its kind:
# compiling the blocks takes about a minute whatever the model (docs/training-speed.md), which a shorter
# run (a test, a smoke run) does not earn back
COMPILE_MIN_RUN_SECONDS = 600
# the fastest of each device kind (FLOP/s), so that a run's duration estimated from its FLOPs is a lower
# bound: a CPU with AMX (bf16 matmuls at 1.97 TFLOP/s measured by train_bench), an H100 (989 TFLOP/s bf16)
FASTEST_FLOPS = {"cpu": 2e12, "cuda": 1e15}


def compile_min_run_flops(device: str) -> float:
    """The model FLOPs of the shortest run ``training.compile: auto`` compiles on ``device``."""
    return COMPILE_MIN_RUN_SECONDS * FASTEST_FLOPS["cuda" if device.startswith("cuda") else "cpu"]


@cache
def inductor_available(device_type: str) -> bool:
    """Whether torch.compile's default backend can generate code for ``device_type``: a C++ compiler on the
    CPU, Triton on a GPU."""
    try:
        if device_type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
            return True
        from torch.utils._triton import has_triton

        return has_triton()
    except Exception:  # no compiler found, or a torch without these private helpers: stay eager
        return False


def _missing_backend(device: str) -> str | None:
    """None when torch.compile can generate code for ``device``, else what is missing."""
    device_type = "cuda" if device.startswith("cuda") else device
    if inductor_available(device_type):
        return None
    return "no C++ compiler (g++, or $CXX) for inductor" if device_type == "cpu" else f"no Triton for {device}"


def compile_for(choice: str, device: str, *, lora: bool, run_flops: float) -> str:
    """What ``training.compile`` stands for: ``blocks``, ``model`` or ``off``.

    auto = blocks where it works and pays, else off: not without a code generator for the device, not
    under LoRA (not measured there: peft's adapter layers sit inside the blocks; an explicit ``blocks``
    compiles them, and gives eager's gradients on a tiny GPT-2), not for a run too short to win the
    compile time back (:func:`compile_min_run_flops`). An explicit choice is kept (the training loop
    checks it can run: :func:`check_compiler`; the planner resolves it for devices it does not have).
    """
    if choice != "auto":
        return choice
    if _missing_backend(device) or lora or run_flops < compile_min_run_flops(device):
        return "off"
    return "blocks"


def check_compiler(compiled: str, device: str) -> None:
    """A config error, before any step, when ``compiled`` (a resolved ``training.compile``) needs a code
    generator ``device`` lacks: torch.compile would fail at the first step."""
    missing = None if compiled == "off" else _missing_backend(device)
    if missing:
        raise ConfigError(f"training.compile: {compiled} needs torch.compile, but there is {missing}; use off")


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block in place (``nn.Module.compile``); returns how many.

    The blocks stay where they are, with their parameters: the state dict, checkpoints, the export and
    distributed wrapping see the same modules (FSDP2's ``fully_shard`` goes on the compiled blocks, as in
    torchtitan). The blocks run the same code, so dynamo compiles one graph and reuses it for all of them;
    it is compiled at the first step, forward and backward.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)
