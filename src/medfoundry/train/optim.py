"""AdamW with decoupled weight decay on matrix weights only, and gradient clipping that works under FSDP2.

Weight decay goes to the weight matrices of ``nn.Linear`` / transformers ``Conv1D`` (GPT-2) /
``nn.Conv*`` layers, including an untied output head (it is a projection like any other). Biases,
all norm weights (any module whose type name contains "Norm", and any 1-D parameter) and embeddings
are not decayed. A parameter owned by several modules (an output head tied to the embedding) is
listed once, under its first name, and is not decayed if any owner is an embedding or a norm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from medfoundry.config import StrictModel


class OptimConfig(StrictModel):
    lr: float = Field(3e-4, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay on weight matrices only")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")
    implementation: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto", description="AdamW kernel: auto = fused wherever torch has it (CUDA, CPU), else foreach"
    )


def _is_matrix_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[decay group, no-decay group]`` (empty ones dropped), each with ``params`` and ``param_names``.

    Frozen parameters (``requires_grad=False``) are left out.
    """
    decay_ids, no_decay_ids = set(), set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Embedding) or "Norm" in type(module).__name__ or p.ndim < 2:
                no_decay_ids.add(id(p))
            elif _is_matrix_layer(module) and pname == "weight":
                decay_ids.add(id(p))
            else:
                no_decay_ids.add(id(p))
    decay_ids -= no_decay_ids
    groups = []
    for wd, wanted in ((weight_decay, lambda i: i in decay_ids), (0.0, lambda i: i not in decay_ids)):
        chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and wanted(id(p))]
        if chosen:
            groups.append({"params": [p for _, p in chosen], "param_names": [n for n, _ in chosen], "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` with the kernel of :func:`adamw_kernel`."""
    groups = param_groups(model, cfg.weight_decay)
    impl = adamw_kernel(cfg.implementation, [p for g in groups for p in g["params"]])
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=True if impl == "fused" else None,
        foreach=impl == "foreach",
    )


def adamw_kernel(choice: str, params: list[torch.Tensor]) -> str:
    """``auto``: the fused kernel (one pass over each tensor for the whole update, CUDA and CPU alike;
    on CPU 24 ms a gpt2-52m step on 2 cores, against 75 ms for foreach's chain of whole-list ops) when
    torch has it for every parameter (floating point, on a device with fused kernels, plain tensors or
    FSDP2 DTensors, which dispatch it shard by shard), else foreach. fused and foreach apply the same
    update up to rounding; each is deterministic, so a run resumes bit-identically on the same one."""
    if choice != "auto":
        return choice
    return "fused" if all(_fused_capable(p) for p in params) else "foreach"


def kernel_of(optimizer: torch.optim.Optimizer) -> str:
    """The AdamW kernel an optimizer from :func:`build_optimizer` runs: fused, foreach or loop."""
    return "fused" if optimizer.defaults["fused"] else "foreach" if optimizer.defaults["foreach"] else "loop"


def _fused_capable(param: torch.Tensor) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    local = param.to_local() if hasattr(param, "to_local") else param
    return local.is_floating_point() and local.device.type in _get_fused_kernels_supported_devices()


def _grads(parameters: Iterable[torch.Tensor] | torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    return params, [p.grad for p in params if p.grad is not None]


def grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Global L2 norm of all gradients, the same on every process; one pass over them.

    It is non-finite exactly when some gradient is (or the sum of squares overflows), so the loop uses
    it both to skip a step and, when finite, to clip (:func:`clip_grads`): one pass and no extra
    collective instead of a finiteness check plus a norm. Under DDP every process holds the same
    all-reduced gradients, hence the same norm. Under FSDP2 the gradients are DTensor shards: the
    norm is reduced over all processes (every process must call this), as in torchtitan.
    """
    params, grads = _grads(parameters)
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):  # DTensor with a pending (partial) reduction
        total = total.full_tensor()
    return total


def clip_grads(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients down to ``max_norm`` given their :func:`grad_norm`; 0 disables clipping.
    A non-finite ``norm`` would make every gradient non-finite: skip the step instead."""
    params, _ = _grads(parameters)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
