"""A decode step's attention on a CPU for a bf16 or fp16 model: torch's fused attention, in fp32.

torch's CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``, what transformers' ``sdpa`` calls)
is several times slower in bf16 than in fp32 for the one query per row of a decode step: on 2 Zen 4 cores, 9
query heads over 3 key/value heads of 64, 435 us in bf16 against 130 us in fp32 (casts included) for 8 rows of
64 columns, 10.7 ms against 3.8 ms for 8 rows of 2,048 columns, 1.6 ms against 0.34 ms for 1 row of 2,048 (for
SmolLM2-135M's 30 layers, a quarter of a bf16 step at batch 8). So for the length of a decode step the engine
points the model's attention at :func:`upcast_sdpa`: query, keys and values cast to fp32, the same kernel, the
output cast back (the cache stays bf16; the attention's own sums were fp32 already). Prefill keeps bf16: its
queries make it a matmul of many rows, where bf16 pays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "medfoundry_fp32_sdpa"
HALF_DTYPES = (torch.bfloat16, torch.float16)


def upcast_sdpa(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention on fp32 copies of ``query``, ``key`` and ``value``; output in their dtype."""
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(NAME, upcast_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the mask sdpa's is: a boolean one


def upcasts(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s decode steps on ``device`` take :func:`upcast_sdpa` while its attention is ``sdpa``
    (:func:`decode_attention`): a bf16 or fp16 model on a CPU."""
    return device.type == "cpu" and model.dtype in HALF_DTYPES


@contextlib.contextmanager
def decode_attention(model: torch.nn.Module, upcast: bool) -> Iterator[None]:
    """Inside the block ``model`` attends through :func:`upcast_sdpa` when ``upcast`` (see :func:`upcasts`) and
    its attention is ``sdpa`` now (a model an evaluation shares may have been switched to another kernel since),
    through ``sdpa`` again after it."""
    if not upcast or model.config._attn_implementation != "sdpa":
        yield
        return
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        model.config._attn_implementation = "sdpa"
