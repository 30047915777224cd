"""``medfoundry pretrain``: pretraining and continued pretraining, one flat loop (after nanoGPT).

Each optimizer step reads ``accum`` micro-batches on every process, counts their target tokens over
all processes, and backpropagates ``sum of token losses / that count``: the loss is normalized over
the whole accumulated global batch, whatever the split into micro-batches and processes. A step
whose loss or gradients are not finite is skipped (weights untouched) and logged; too many in a row
stop the run with the last good checkpoint intact. Checkpoints carry everything the next step
depends on (weights, optimizer, schedule, data position, RNG states), so a killed run resumes
bit-identically.

Speed (:mod:`medfoundry.train.accel`, :mod:`medfoundry.train.losses`): the attention kernel chosen for
the device and context, a native GELU kernel, the output layer fused with the loss, fused AdamW, and
one gradient-norm pass that serves both the finiteness check and clipping.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfoundry import __version__
from medfoundry.errors import ConfigError, MedfoundryError
from medfoundry.io import write_json
from medfoundry.model.presets import flops_per_token
from medfoundry.runtime import configure, resolve_device_precision
from medfoundry.tokenizer.reader import WindowReader
from medfoundry.tokenizer.shards import TokenShards
from medfoundry.train import distributed
from medfoundry.train.accel import fuse_output_layer, native_gelu, set_attention
from medfoundry.train.checkpoint import CheckpointWriteError, latest_checkpoint, load_checkpoint, save_checkpoint
from medfoundry.train.config import PretrainConfig
from medfoundry.train.losses import NextTokenLoss
from medfoundry.train.metrics import MetricsLog, peak_flops, plot_losses, require_tensorboard
from medfoundry.train.model_setup import build_model, check_vocab
from medfoundry.train.optim import build_optimizer, clip_grads, grad_norm, kernel_of
from medfoundry.train.schedules import build_scheduler


class Validation:
    """Fixed validation windows (the same every time), spread over processes; loss, perplexity, bits per byte."""

    def __init__(self, shards: TokenShards, context: int, batches: int, micro: int, tokenizer, d: distributed.Dist):
        n = min(batches * micro, (shards.total_tokens - 1) // context)
        if n == 0:
            raise ConfigError(f"the validation split has fewer than {context + 1} tokens: lower model.context")
        mine = range(d.rank, n, d.world_size)
        self.windows = [np.asarray(shards.slice(i * context, i * context + context + 1), dtype=np.int64) for i in mine]
        self.micro, self.context = micro, context
        # under FSDP each forward pass all-gathers the weights: every process makes as many as the busiest one
        self.passes = math.ceil(math.ceil(n / d.world_size) / micro)
        self.bytes = sum(len(tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in self.windows)

    @torch.no_grad()
    def run(self, model, token_losses: NextTokenLoss, device: str, d: distributed.Dist) -> dict:
        model.eval()
        loss_sum, count = 0.0, 0
        for start in range(0, self.passes * self.micro, self.micro):
            if start >= len(self.windows):  # a fewer-windows process keeps step with the others; not counted
                dummy = torch.zeros((1, self.context + 1), dtype=torch.long, device=device)
                token_losses(model, dummy)
                continue
            batch = torch.from_numpy(np.stack(self.windows[start : start + self.micro])).to(device)
            loss, n = token_losses(model, batch)
            loss_sum, count = loss_sum + loss.item(), count + n
        model.train()
        loss_sum, count = distributed.all_reduce_sum(loss_sum, d, device), distributed.all_reduce_sum(count, d, device)
        total_bytes = distributed.all_reduce_sum(self.bytes, d, device)
        loss = loss_sum / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": loss_sum / math.log(2) / total_bytes}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_tokenizer(tokenizer_dir: str):
    from medfoundry.tokenizer.files import load_hf_tokenizer

    return load_hf_tokenizer(tokenizer_dir)


def pretrain(cfg: PretrainConfig) -> dict:
    return run_distributed(cfg, _pretrain_job)


def run_distributed(cfg, make_job: Callable) -> dict:
    """Set up the device and the process group, build the run's :class:`Job` and :func:`train` it."""
    device, precision = resolve_device_precision("auto", cfg.training.precision)
    configure()
    d = distributed.init_distributed(cfg.distributed.backend, device)
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    try:
        if cfg.log.tensorboard:
            require_tensorboard()
        _seed_everything(cfg.training.seed)
        return train(make_job(cfg, d, device, precision), d, device)
    finally:
        distributed.shutdown(d)


@dataclass
class Job:
    """What a run trains, on what, and how it is exported: all that differs between pretraining and
    fine-tuning. :func:`train` does the rest (optimizer, schedule, accumulation, skipping, validation,
    checkpoints, exact resume, logging)."""

    cfg: Any  # the run's config, resolved (a PretrainConfig or FinetuneConfig)
    model: torch.nn.Module  # wrapped for the distributed strategy
    loss: Callable  # (model as called, batch) -> (summed loss tensor, its number of targets)
    reader: Any  # next(reader) -> a CPU batch; state_dict() / load_state_dict()
    counts: Callable  # batch -> (targets carrying loss, tokens processed), before the forward pass
    validation: Any  # .run(model as called, loss, device, d) -> metrics; None: no validation split
    export: Callable  # (plain model, directory) -> None: the Hugging Face checkpoint
    step_flops: Callable  # (tokens, targets) -> the model FLOPs of a step that processed them (for MFU)
    info: dict = field(default_factory=dict)  # for run.json: kernels, data...


def _pretrain_job(cfg: PretrainConfig, d: distributed.Dist, device: str, precision: str) -> Job:
    from medfoundry.model.export import export_hf
    from medfoundry.model.load import hf_directory

    tokens = Path(cfg.data.tokens_dir)
    verify = cfg.data.verify_shards
    train_shards, val_shards = TokenShards(tokens / "train", verify=verify), TokenShards(tokens / "val", verify=verify)
    tokenizer_dir = hf_directory(cfg.data.tokenizer_dir)  # a .gguf: its dequantized checkpoint's tokenizer
    tokenizer = _load_tokenizer(tokenizer_dir)
    model, token_losses, kernels = _build(cfg, len(tokenizer), train_shards.vocab_size, d, device, precision)
    reader = WindowReader(
        train_shards,
        cfg.model.context,
        cfg.training.micro_batch_size,
        rank=d.rank,
        world_size=d.world_size,
        seed=cfg.training.seed,
    )
    validation = Validation(
        val_shards, cfg.model.context, cfg.eval.batches, cfg.training.micro_batch_size, tokenizer, d
    )
    return Job(
        cfg=cfg,
        model=model,
        loss=token_losses,
        reader=_Tensors(reader),
        counts=_window_counts,
        validation=validation,
        export=lambda m, out: export_hf(m, tokenizer_dir, out),
        step_flops=_per_token(flops_per_token(distributed.unwrap(model).config, cfg.model.context)),
        info={"kernels": kernels},
    )


class _Tensors:
    """The window reader's numpy batches as tensors (its state is the reader's)."""

    def __init__(self, reader: WindowReader):
        self.reader = reader

    def __next__(self) -> torch.Tensor:
        return torch.from_numpy(next(self.reader))

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)


def _per_token(flops: float) -> Callable:
    return lambda tokens, targets: tokens * flops


def _window_counts(batch: torch.Tensor) -> tuple[int, int]:
    n = batch[:, 1:].numel()
    return n, n


def to_device(batch, device: str):
    """A batch (a tensor or a dict of tensors) on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def train(job: Job, d: distributed.Dist, device: str) -> dict:
    """The training loop, for a pretraining or fine-tuning :class:`Job` (their configs have the same
    ``training``, ``optim``, ``schedule``, ``checkpoint``, ``eval`` and ``log`` sections)."""
    cfg = job.cfg
    out = Path(cfg.output_dir)
    accum = cfg.grad_accumulation(d.world_size)
    model, loss_fn = job.model, job.loss
    trained = torch.compile(model) if cfg.training.compile else model
    optimizer = build_optimizer(distributed.unwrap(model), cfg.optim)
    kernels = {**job.info.get("kernels", {}), "optimizer": kernel_of(optimizer)}
    scheduler = build_scheduler(optimizer, cfg.training.steps, cfg.schedule)

    ckpt_dir = out / "checkpoints"
    state = {"step": 0, "extra": {"tokens": 0, "targets": 0, "skipped_in_a_row": 0, "skipped": 0}}
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        # every process reads it; under FSDP2 the tensors are scattered to the shards (a collective)
        state = load_checkpoint(
            latest, model=distributed.unwrap(model), optimizer=optimizer, scheduler=scheduler, verify=False
        )  # latest_checkpoint has just checked it
        job.reader.load_state_dict(state["reader_state"])
    log = MetricsLog(
        out / "metrics.jsonl",
        enabled=d.is_main,
        resume_step=state["step"],
        tensorboard=out / "tensorboard" if cfg.log.tensorboard else None,
    )
    peak = peak_flops(device, job.loss.precision) * d.world_size
    if d.is_main:
        write_json(
            out / "run.json",
            {
                "version": __version__,
                "config": cfg.model_dump(),
                "world_size": d.world_size,
                "device": device,
                "precision": job.loss.precision,
                "grad_accumulation": accum,
                **job.info,
                "kernels": kernels,
            },
        )

    step, extra = state["step"], state["extra"]
    try:
        if step == 0 and job.validation is not None:  # the starting point: for continued training, the number to beat
            log.eval(0, job.validation.run(trained, loss_fn, device, d))
        with log.progress(cfg.training.steps, initial=step) as bar:
            while step < cfg.training.steps:
                started = time.perf_counter()
                batches = [to_device(next(job.reader), device) for _ in range(accum)]
                loss_value, norm, n_targets, n_tokens = _train_step(job, trained, batches, optimizer, cfg, d, device)
                finite = math.isfinite(loss_value) and math.isfinite(norm)
                extra["skipped"] += not finite
                extra["skipped_in_a_row"] = 0 if finite else extra["skipped_in_a_row"] + 1
                scheduler.step()
                step += 1
                extra["tokens"] += int(n_tokens)
                extra["targets"] = extra.get("targets", 0) + int(n_targets)
                elapsed = time.perf_counter() - started
                tok_s = n_tokens / elapsed
                log.step(
                    step,
                    bar,
                    loss=loss_value,
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=norm,
                    tok_s=tok_s,
                    mfu=job.step_flops(n_tokens, n_targets) / elapsed / peak,
                    tokens=extra["tokens"],
                    targets=extra["targets"],
                    skipped=not finite,
                    every=cfg.log.every,
                )
                if extra["skipped_in_a_row"] >= cfg.training.max_consecutive_skips:
                    last = latest_checkpoint(ckpt_dir)
                    raise MedfoundryError(
                        f"{extra['skipped_in_a_row']} steps in a row had a non-finite loss or gradient "
                        f"(step {step}); stopping. Last good checkpoint: {last or 'none'}. "
                        "Lower optim.lr, raise schedule.warmup_steps or check the data."
                    )
                if job.validation is not None and (step % cfg.eval.every == 0 or step == cfg.training.steps):
                    log.eval(step, job.validation.run(trained, loss_fn, device, d))
                if step % cfg.checkpoint.every == 0 or step == cfg.training.steps:
                    _save(ckpt_dir, step, model, optimizer, scheduler, job.reader, extra, cfg, d, device)
    finally:
        log.close()
    return _finish(job, model, log, out, d)


def _build(
    cfg: PretrainConfig, tokenizer_size: int, shard_vocab: int, d: distributed.Dist, device: str, precision: str
) -> tuple[torch.nn.Module, NextTokenLoss, dict]:
    """The model, with the speed-ups of :mod:`medfoundry.train.accel` and wrapped for the strategy; its
    loss; and the kernels chosen (recorded in run.json)."""
    model = build_model(cfg, tokenizer_size, Path(cfg.output_dir) / "base")
    check_vocab(model, shard_vocab, cfg.data.tokenizer_dir)
    attention = set_attention(model, cfg.training.attention, device, cfg.model.context)
    native_gelu(model)
    head = fuse_output_layer(model, cfg.training.loss)
    model.to(device)
    if cfg.training.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model = distributed.wrap_model(model, cfg.distributed.strategy, device, d)
    return (
        model,
        NextTokenLoss(head, precision, device),
        {"attention": attention, "loss": "plain" if head is None else "chunked"},
    )


def _train_step(
    job: Job, trained, batches: list, optimizer, cfg, d: distributed.Dist, device: str
) -> tuple[float, float, float, float]:
    """Forward and backward over the step's micro-batches, then the update unless the loss or the
    gradient norm is not finite. Returns (mean loss over the global batch's targets, gradient norm,
    global targets, global tokens). Both values are the same on every process (an all-reduced loss;
    the norm of all-reduced or, under FSDP2, globally reduced gradients), so all processes skip or
    step together without another collective."""
    counts = [job.counts(b) for b in batches]
    n_global = distributed.all_reduce_sum(sum(c[0] for c in counts), d, device)
    tokens_global = distributed.all_reduce_sum(sum(c[1] for c in counts), d, device)
    scale = d.world_size / max(n_global, 1)  # DDP/FSDP average over processes
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        with distributed.gradient_sync(job.model, sync=i == len(batches) - 1):
            loss, _ = job.loss(trained, batch)
            (loss * scale).backward()
        loss_sum += loss.item()
    loss_value = distributed.all_reduce_sum(loss_sum, d, device) / max(n_global, 1)
    norm = grad_norm(job.model.parameters())
    norm_value = norm.item()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        clip_grads(job.model.parameters(), cfg.optim.grad_clip, norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, n_global, tokens_global


def _save(ckpt_dir, step, model, optimizer, scheduler, reader, extra, cfg, d: distributed.Dist, device: str) -> None:
    model_state = optim_state = None
    if distributed.is_sharded(model):  # FSDP2: every process takes part in gathering whole tensors; process 0 gets them
        model_state, optim_state = distributed.full_model_state(model), distributed.full_optim_state(model, optimizer)
    error = None
    if d.is_main:
        try:
            save_checkpoint(
                ckpt_dir,
                step,
                model=distributed.unwrap(model),
                optimizer=optimizer,
                scheduler=scheduler,
                reader_state=reader.state_dict(),
                extra=dict(extra),
                keep_last=cfg.checkpoint.keep_last,
                model_state=model_state,
                optim_state=optim_state,
            )
        except CheckpointWriteError as exc:
            error = exc
    if distributed.any_failed(d, error is not None, device):
        raise error or CheckpointWriteError(f"step {step}: process 0 could not write the checkpoint (see its error)")


def _finish(job: Job, model, log: MetricsLog, out: Path, d: distributed.Dist) -> dict:
    summary = log.summary()
    # FSDP2: every process gathers the weights into a plain model on process 0
    exported = distributed.unsharded_copy(model) if distributed.is_sharded(model) else distributed.unwrap(model)
    if d.is_main:
        job.export(exported, out / "model")
        plot_losses(out / "metrics.jsonl", out / "plots" / "loss.png")
        write_json(out / "summary.json", summary)
    distributed.barrier(d)
    return summary if d.is_main else {}  # one report per run, not one per process
