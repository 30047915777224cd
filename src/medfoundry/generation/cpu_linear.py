"""Few-row linears on a CPU: a decode step's matmuls at the speed the weights stream from memory.

A decode step multiplies 1-8 rows (one per running request) by every weight matrix of the model, so it is as fast
as the weights can be read. On 2 AVX2 cores, MKL reads SmolLM2-135M's fp32 weights at 6-7 GB/s for 1 row and 3-4
for 8 (a small GEMM), oneDNN its bf16 weights at 10 and 2; the kernel in ``kernels/few_row_linear.cpp`` at 11-12
and 9-11 (fp32), 10-12 and 5 (bf16, where 8 rows are bound by the loads of the inputs). Where the CPU has AVX-512
BF16 and inputs and weights are bf16, the kernel multiplies with ``vdpbf16ps``: on 2 Zen 4 cores 13-21 GB/s at 8
rows against the AVX2 path's 7-9, and the same at 1 row (the memory's pace).
``benchmarks/profile_ops.py --decode-linears kernel|torch`` profiles the decode step with either. During a decode
step, the engine's model's linears run that kernel when they have at most :data:`MAX_ROWS` rows
(:func:`decode_linears`): the model stays a plain transformers model, and under ``torch.compile`` the kernel is one
opaque op of the graph.

The kernel is compiled on first use with torch's C++ extension builder (a C++ compiler and ninja, as for
``torch.compile`` on a CPU; about 20 s, then cached by torch under ``~/.cache/torch_extensions``). Where it cannot
be built or run (no AVX2, another architecture, no compiler) the linears stay torch's, and the reason is logged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).parent / "kernels" / "few_row_linear.cpp"
MAX_ROWS = 8
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
# -fopenmp: at::parallel_for is compiled into the kernel, and without OpenMP it runs on one thread
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


class FewRowLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward runs the few-row kernel when it fits (:func:`fits`), torch's otherwise. The
    engine gives its model's linears this class for the length of a decode step only (:func:`decode_linears`):
    parameters, state dict and every other forward stay those of ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fits(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.medfoundry.few_row_linear(x.reshape(-1, x.shape[-1]), self.weight)
        out = out.view(*x.shape[:-1], self.weight.shape[0])
        return out if self.bias is None else out + self.bias


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes ``x`` @ ``weight``.T: on a CPU, at most :data:`MAX_ROWS` rows, a contiguous fp32 or
    bf16 weight."""
    return (
        x.device.type == "cpu"
        and x.dim() >= 2
        and x.shape[:-1].numel() <= MAX_ROWS
        and weight.dtype in WEIGHT_DTYPES
        and weight.is_contiguous()
    )


def few_row_linears(model: torch.nn.Module, device: torch.device) -> list[torch.nn.Linear]:
    """The linears of ``model`` that decode steps on ``device`` run with the kernel: every plain ``nn.Linear`` on a
    CPU where the kernel can be had (see :func:`load_kernel`), none elsewhere."""
    if device.type != "cpu" or not load_kernel():
        return []
    return [module for module in model.modules() if type(module) is torch.nn.Linear]


@contextlib.contextmanager
def decode_linears(linears: list[torch.nn.Linear]) -> Iterator[None]:
    """``linears`` are :class:`FewRowLinear` inside the block, ``nn.Linear`` again after it. A class swap, not a
    ``TorchFunctionMode``: a mode would send every torch call of the step through Python (about 23 ms of
    SmolLM2's 86 ms eager step), the swap costs one attribute per linear; compiled, the graph holds the kernel's op."""
    for module in linears:
        module.__class__ = FewRowLinear
    try:
        yield
    finally:
        for module in linears:
            module.__class__ = torch.nn.Linear


@functools.cache
def load_kernel() -> bool:
    """Builds (first time only) and loads ``medfoundry::few_row_linear``; False, with the reason logged, where it
    cannot run here. The library's name carries a digest of the source and flags, so an edited kernel is
    rebuilt."""
    reason = unsupported_reason()
    if reason:
        log.info("few-row CPU linears off: %s", reason)
        return False
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(KERNEL_SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    try:
        load(
            f"medfoundry_few_row_linear_{digest}",
            [str(KERNEL_SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError) as err:  # no compiler or ninja, a failed build
        log.warning("few-row CPU linears off: the kernel did not build (%s)", err)
        return False
    torch.library.register_fake("medfoundry::few_row_linear")(_output_like)
    return True


def _output_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's output shape and dtype, for tracing under ``torch.compile``."""
    return x.new_empty((x.shape[0], weight.shape[0]))


def unsupported_reason() -> str | None:
    """Why the kernel cannot run on this machine, or None: it needs x86-64 with AVX2 and FMA (which torch reports
    as its CPU capability AVX2 or AVX512)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is for x86-64 (AVX2), this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX2", "AVX512")):
        return f"the kernel needs AVX2 and FMA, torch reports this CPU's capability as {capability}"
    return None
