"""The engine's compiled decode step: when to compile it, how, and the shapes it sees.

A decode step in eager mode runs a few hundred small operations (per layer: norms, projections, RoPE, attention,
the cache's writes), each dispatched from Python. ``torch.compile`` turns the whole forward into one graph whose
non-matmul work Inductor fuses into a few kernels (C++ on a CPU, Triton on a GPU, where CUDA graphs also remove
the launch of each kernel); the matmuls stay the vendor library's (on a CPU, the few-row kernel's: see
:mod:`medfoundry.generation.cpu_linear`).

Shapes: the batch and the number of cache columns attended are dynamic sizes of the graph (the columns read from
the attention mask's shape: see :meth:`medfoundry.generation.cache.SlotCache.bind_decode`), so that one
compilation serves every step of more than one row, and a second one (a size of 1 is always a constant to the
compiler) the steps of one row. A batch of one is not padded to two: on a CPU a matrix-vector product is a
``gemv``, twice as fast as the ``gemm`` of two rows on the LM head (measured on SmolLM2-135M). On a GPU the
batch is padded to a power of two (at most the engine's slots) and the columns rounded up to
:data:`CUDA_KV_BUCKET`: a CUDA graph is recorded per distinct shape, and the buckets bound their number. Prefill
stays eager: its shapes change with every prompt.
"""

from __future__ import annotations

import os
import shutil

import torch

from medfoundry.errors import ConfigError

COMPILE_CHOICES = ("auto", "on", "off")
CPU_COMPILE_PAYS = 135_000_000 * 20_000  # parameters x generated tokens: see compile_pays_on_cpu
CUDA_KV_BUCKET = 256  # cache columns per CUDA graph shape: at most max_seq_len / 256 graphs per batch bucket


def should_compile(choice: str, device: torch.device, *, long_lived: bool = False) -> bool:
    """Whether the decode step is compiled. ``on`` insists (an error where it cannot work); ``auto`` compiles on a
    CUDA device with Triton, where CUDA graphs remove a launch per kernel, and on a CPU in a ``long_lived`` process
    (the server; an evaluation's chain of thought when it earns the compile: :func:`compile_pays_on_cpu`). On a
    CPU the compiled step removes the per-layer Python of transformers and fuses the small ops between the
    linears: SmolLM2-135M in fp32 decoded 1.6-1.7x faster at batch 1 and 1.2-1.5x at batch 8 with the few-row
    kernel (:mod:`medfoundry.generation.cpu_linear`), 1.15-1.5x and 1.15x with torch's linears (2 AVX2 cores,
    two runs each). Compiling SmolLM2's step takes 40-50 s there in fp32, 2 minutes in emulated bf16: a price a
    server pays once at start-up (:meth:`medfoundry.generation.engine.Engine.warmup`), not a one-shot
    ``generate``."""
    if choice not in COMPILE_CHOICES:
        raise ConfigError(f"compile={choice!r}: must be one of {', '.join(COMPILE_CHOICES)}")
    if choice == "off" or (choice == "auto" and device.type != "cuda" and not long_lived):
        return False
    missing = _missing_toolchain(device)
    if missing and choice == "on":
        raise ConfigError(f"compile=on: {missing} (use compile=off, or auto)")
    return not missing


def compile_pays_on_cpu(parameters: int, new_tokens: int) -> bool:
    """Whether a one-shot job (an evaluation's chain of thought) generates enough on a CPU to earn the decode
    step's compile: ``parameters`` x ``new_tokens`` at least :data:`CPU_COMPILE_PAYS`. SmolLM2-135M in fp32 on 2
    AVX2 cores compiles in 40-50 s and then decodes 1.2-1.7x faster than the eager ~60-95 tokens/s of a batch of
    8, which saves those seconds after about 20,000 tokens; a larger model decodes slower per token for a
    compile that grows only with its depth, so the product is conservative for it."""
    return parameters * new_tokens >= CPU_COMPILE_PAYS


def _missing_toolchain(device: torch.device) -> str | None:
    """What Inductor would lack to compile for ``device``, or None."""
    if device.type == "cuda":
        import importlib.util

        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "c++"
        return None if shutil.which(compiler) or shutil.which("g++") else f"no C++ compiler ({compiler}) on PATH"
    return f"the compiled decode step supports cpu and cuda, not {device.type}"


def compile_decode(fn, device: torch.device):
    """``fn`` compiled for ``device``: with CUDA graphs on a GPU (``reduce-overhead``); on a CPU, Inductor's
    default with its C++ kernels single-threaded (``cpp.threads=1``): a decode step's fused kernels are a few
    thousand elements each, and an OpenMP region per kernel (some 200 per step) made SmolLM2's step 3-4x slower
    than eager on 2 busy cores, each region waiting for both threads to be scheduled; the matmuls stay MKL's and
    keep every thread. Neither ``freezing`` (oneDNN weights packed once) nor ``max-autotune`` with the C++ GEMM
    template made a small SmolLM2 decode faster on an AVX2 CPU, and both cost compile time and a second copy of
    the weights."""
    if device.type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", dynamic=None)
    return torch.compile(fn, dynamic=None, options={"cpp.threads": 1})


def batch_bucket(count: int, max_batch: int, device: torch.device) -> int:
    """The padded batch of a step with ``count`` rows: on a GPU the next power of two, at most ``max_batch`` (the
    padding rows are free ones); on a CPU ``count`` itself."""
    if device.type != "cuda":
        return count
    return min(1 << (count - 1).bit_length(), max_batch)


def kv_bucket(columns: int, max_len: int, device: torch.device) -> int:
    """Cache columns a step attends over: exact on a CPU (the size is dynamic), rounded up on a GPU."""
    if device.type != "cuda":
        return columns
    return min(-(-columns // CUDA_KV_BUCKET) * CUDA_KV_BUCKET, max_len)


def mark_dynamic_sizes(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
    """Trace the batch and the columns attended as sizes, not constants: one graph for every step of more than one
    row (the cache's spare row and column keep either from reaching the end of a buffer, where it would be a
    constant again). On a GPU, CUDA graphs are still recorded per distinct shape: the buckets bound them."""
    if ids.shape[0] > 1:  # else an engine of one slot: its batch is always 1
        for tensor in (ids, positions, mask):
            torch._dynamo.mark_dynamic(tensor, 0)
    torch._dynamo.mark_dynamic(mask, 1)
