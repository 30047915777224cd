"""``medfoundry pretrain``: pretraining and continued pretraining, one flat loop (after nanoGPT).

Each optimizer step reads ``accum`` micro-batches on every process, counts their target tokens over
all processes, and backpropagates ``sum of token losses / that count``: the loss is normalized over
the whole accumulated global batch, whatever the split into micro-batches and processes. A step
whose loss or gradients are not finite is skipped (weights untouched) and logged; too many in a row
stop the run with the last good checkpoint intact. Checkpoints (:class:`~medfoundry.train.checkpoint.
Checkpointer`) carry everything the next step depends on (weights, optimizer, schedule, and the
:class:`~medfoundry.train.state.TrainState`: counters, data position, RNG states), so a killed run
resumes bit-identically. What differs between pretraining and fine-tuning is a :class:`Job`.

Speed (:mod:`medfoundry.train.accel`, :mod:`medfoundry.train.losses`): the attention kernel chosen for
the device and context, a native GELU kernel, the transformer blocks compiled in place where the run is
long enough (``training.compile``), the output layer fused with the loss, fused AdamW, one gradient-norm
pass that serves both the finiteness check and clipping, and one host sync per step (the loss and the
norm, read together).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from medfoundry.errors import ConfigError, StageFailed
from medfoundry.extras import require
from medfoundry.io import write_json
from medfoundry.model.bits_per_byte import bits_per_byte, special_ids, text_bytes, text_mask
from medfoundry.model.presets import flops_per_token
from medfoundry.runtime import configure, resolve_device_precision
from medfoundry.tokenizer.reader import WindowReader
from medfoundry.tokenizer.token_shards import TokenShards
from medfoundry.train import distributed
from medfoundry.train.accel import check_compiler
from medfoundry.train.checkpoint import Checkpointer
from medfoundry.train.config import PretrainConfig, RunConfig
from medfoundry.train.losses import NextTokenLoss
from medfoundry.train.materialize import materialize
from medfoundry.train.memory import PhaseMemory
from medfoundry.train.metrics import MetricsLog, Peak, device_peak, plot_losses
from medfoundry.train.model_setup import build_model, check_vocab, prepare_for_training, pretrained_source
from medfoundry.train.optim import build_optimizer, clip_grads, grad_norm, kernel_of
from medfoundry.train.schedules import build_scheduler
from medfoundry.train.state import Stateful, TrainState

Batch = torch.Tensor | dict[str, torch.Tensor]  # a batch of windows, or of fine-tuning sequences and their labels


class Loss(Protocol):
    """The summed loss of a batch through the model as called (wrapped), and its number of targets."""

    precision: str

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]: ...


class BatchReader(Stateful, Protocol):
    """The next CPU batch of this process; its position is saved in checkpoints."""

    def __next__(self) -> Batch: ...


class BatchCounts(Protocol):
    """(targets carrying loss, tokens processed) of a batch, before the forward pass."""

    def __call__(self, batch: Batch) -> tuple[int, int]: ...


class Validation(Protocol):
    """Metrics on the held-out data (a collective: every process runs it)."""

    def run(self, model: nn.Module, loss: Loss, device: str, d: distributed.Dist) -> dict[str, float]: ...


class Exporter(Protocol):
    """Write the Hugging Face checkpoint of the trained model (as trained: wrapped, maybe sharded) into
    ``directory``. Called on every process (a sharded model is gathered a tensor at a time)."""

    def __call__(self, model: nn.Module, directory: Path) -> None: ...


class StepFlops(Protocol):
    """The model FLOPs of a step that processed ``tokens`` and had ``targets`` (for MFU)."""

    def __call__(self, tokens: float, targets: float) -> float: ...


class WindowValidation:
    """Fixed validation windows (the same every time), spread over processes; loss, perplexity, bits per byte.

    ``val_loss`` and ``val_ppl`` count every target; ``val_bpb`` the text targets only, over the UTF-8 bytes
    of their text: a predicted special token (the EOS between documents) adds neither its loss nor bytes
    (:mod:`medfoundry.model.bits_per_byte`, the definition the eval stage's perplexity uses too)."""

    def __init__(self, shards: TokenShards, context: int, batches: int, micro: int, tokenizer, d: distributed.Dist):
        n = min(batches * micro, (shards.total_tokens - 1) // context)
        if n == 0:
            raise ConfigError(f"the validation split has fewer than {context + 1} tokens: lower model.context")
        mine = range(d.rank, n, d.world_size)
        self.windows = [np.asarray(shards.slice(i * context, i * context + context + 1), dtype=np.int64) for i in mine]
        self.micro, self.context = micro, context
        # under FSDP each forward pass all-gathers the weights: every process makes as many as the busiest one
        self.passes = math.ceil(math.ceil(n / d.world_size) / micro)
        special = special_ids(tokenizer)
        self.special = [~text_mask(w[1:], special) for w in self.windows]  # targets that are special tokens
        self.bytes = sum(text_bytes(tokenizer, w[1:], special) for w in self.windows)

    @torch.no_grad()
    def run(self, model: nn.Module, token_losses: NextTokenLoss, device: str, d: distributed.Dist) -> dict[str, float]:
        model.eval()
        loss_sum, text_sum, count = 0.0, 0.0, 0
        for start in range(0, self.passes * self.micro, self.micro):
            if start >= len(self.windows):  # a fewer-windows process keeps step with the others; not counted
                dummy = torch.zeros((1, self.context + 1), dtype=torch.long, device=device)
                token_losses(model, dummy)
                continue
            batch = torch.from_numpy(np.stack(self.windows[start : start + self.micro])).to(device)
            special = torch.from_numpy(np.stack(self.special[start : start + self.micro])).to(device)
            text, other = (x.item() for x in token_losses.text_and_special(model, batch, special))
            loss_sum, text_sum, count = loss_sum + text + other, text_sum + text, count + special.numel()
        model.train()
        loss_sum, text_sum, count, total_bytes = distributed.all_reduce_sums(
            [loss_sum, text_sum, count, self.bytes], d, device
        )
        loss = loss_sum / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": bits_per_byte(text_sum, total_bytes)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(cfg: PretrainConfig) -> dict:
    return run_distributed(cfg, _pretrain_job)


def run_distributed(cfg: RunConfig, make_job: Callable[..., Job]) -> dict:
    """Set up the device and the process group, build the run's :class:`Job` and :func:`train` it, holding the
    output folder's lock throughout (once for the job: :func:`~medfoundry.train.distributed.folder_lock_of_job`).
    So the run alone writes its folder, and what it removes there as leftovers of a killed run (hidden
    checkpoint and export folders) is never another live run's."""
    device, precision = resolve_device_precision("auto", cfg.training.precision)
    configure()
    d = distributed.init_distributed(cfg.distributed.backend, device)
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    try:
        with distributed.folder_lock_of_job(cfg.output_dir, "training", d):
            if cfg.log.tensorboard:  # checked before any work
                require("tensorboard", "log.tensorboard")
            if cfg.log.wandb is not None and d.is_main:
                require("wandb", "log.wandb")
            _seed_everything(cfg.training.seed)
            return train(make_job(cfg, d, device, precision), d, device)
    finally:
        distributed.shutdown(d)


@dataclass
class Job:
    """What a run trains, on what, and how it is exported: all that differs between pretraining and
    fine-tuning. :func:`train` does the rest (optimizer, schedule, accumulation, skipping, validation,
    checkpoints, exact resume, logging)."""

    cfg: RunConfig  # the run's config, resolved (a PretrainConfig or FinetuneConfig)
    model: nn.Module  # as the loss calls it, wrapped for the distributed strategy
    loss: Loss
    reader: BatchReader
    counts: BatchCounts
    validation: Validation | None  # None: no validation split
    export: Exporter
    step_flops: StepFlops
    info: dict = field(default_factory=dict)  # for run.json: kernels, data...
    # writes the model's description (config, generation config, tokenizer; no weights) into a folder:
    # every checkpoint carries it, so that any saved step exports alone (`medfoundry export`); None: not
    describe: Callable[[Path], None] | None = None


def _pretrain_job(cfg: PretrainConfig, d: distributed.Dist, device: str, precision: str) -> Job:
    from medfoundry.model.export import Weights, export_hf
    from medfoundry.model.load import load_tokenizer, tokenizer_directory

    tokens = Path(cfg.data.tokens_dir)
    verify = cfg.data.verify_shards
    train_shards, val_shards = TokenShards(tokens / "train", verify=verify), TokenShards(tokens / "val", verify=verify)
    tokenizer_dir = tokenizer_directory(cfg.data.tokenizer_dir)  # a .gguf: its embedded tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    model, token_losses, kernels = _build(cfg, len(tokenizer), train_shards.vocab_size, d, device, precision)
    lm, dtype = distributed.unwrap(model), cfg.export.torch_name(precision)
    reader = WindowReader(
        train_shards,
        cfg.model.context,
        cfg.training.micro_batch_size,
        rank=d.rank,
        world_size=d.world_size,
        seed=cfg.training.seed,
    )
    validation = WindowValidation(
        val_shards, cfg.model.context, cfg.eval.batches, cfg.training.micro_batch_size, tokenizer, d
    )
    return Job(
        cfg=cfg,
        model=model,
        loss=token_losses,
        reader=_Tensors(reader),
        counts=_window_counts,
        validation=validation,
        export=lambda m, out: distributed.export_on_main(
            m, d, device, lambda weights: export_hf(weights, tokenizer_dir, out, dtype=dtype)
        ),
        describe=lambda out: export_hf(Weights.describing(lm), tokenizer_dir, out, dtype=dtype),
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


def _per_token(flops: float) -> StepFlops:
    return lambda tokens, targets: tokens * flops


def _window_counts(batch: torch.Tensor) -> tuple[int, int]:
    n = batch[:, 1:].numel()
    return n, n


def to_device(batch: Batch, device: str) -> Batch:
    """A batch (a tensor or a dict of tensors) on ``device``: on a GPU copied from pinned host memory
    without waiting (the copy overlaps the work already queued)."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if device.startswith("cuda"):
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


@dataclass
class _Run:
    """What the steps of a run share."""

    job: Job
    trained: nn.Module  # the job's model, or torch.compile of it (training.compile: model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpointer: Checkpointer
    log: MetricsLog
    peak: float  # FLOP/s of all processes together: the MFU denominator
    d: distributed.Dist
    device: str
    memory: PhaseMemory


def train(job: Job, d: distributed.Dist, device: str) -> dict:
    """The training loop, for a pretraining or fine-tuning :class:`Job` (their configs have the same
    ``training``, ``optim``, ``schedule``, ``checkpoint``, ``eval`` and ``log`` sections)."""
    cfg = job.cfg
    out = Path(cfg.output_dir)
    compiled = job.info.get("kernels", {}).get("compile", "off")
    check_compiler(compiled, device)
    memory = PhaseMemory(device)
    memory.close("init")  # the process so far: imports, the model built and sharded
    optimizer = build_optimizer(distributed.unwrap(job.model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.training.steps, cfg.schedule)
    checkpointer = Checkpointer(
        out / "checkpoints",
        model=job.model,
        optimizer=optimizer,
        scheduler=scheduler,
        reader=job.reader,
        keep_last=cfg.checkpoint.keep_last,
        dist=d,
        device=device,
        async_save=cfg.checkpoint.async_save,
        describe=job.describe,
    )
    with memory.phase("resume"):
        state = checkpointer.restore()
    log = MetricsLog(
        out / "metrics.jsonl",
        enabled=d.is_main,
        resume_step=state.step,
        tensorboard=out / "tensorboard" if cfg.log.tensorboard else None,
        wandb=cfg.log.wandb,
        config=cfg.model_dump(mode="json"),
    )
    peak = device_peak(device, job.loss.precision)  # published for known accelerators, else measured
    run = _Run(
        job=job,
        trained=torch.compile(job.model) if compiled == "model" else job.model,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpointer=checkpointer,
        log=log,
        peak=peak.flops * d.world_size,
        d=d,
        device=device,
        memory=memory,
    )
    if d.is_main:
        _write_run_json(job, out, d, device, kernel_of(optimizer), peak)
        print(f"MFU against {_peak_text(peak)}", file=sys.stderr, flush=True)
    try:
        if state.step == 0 and job.validation is not None:  # the starting point: continued training's number to beat
            log.eval(0, job.validation.run(run.trained, job.loss, device, d))
        with log.progress(cfg.training.steps, initial=state.step) as bar:
            while state.step < cfg.training.steps:
                with memory.phase("train"):
                    _step(run, state, bar)
                _after_step(run, state)
        if cfg.checkpoint.async_save:  # the last background save, finished
            with memory.phase("save"):
                checkpointer.wait()
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return _finish(job, job.model, log, out, d, memory)


def _write_run_json(job: Job, out: Path, d: distributed.Dist, device: str, optimizer_kernel: str, peak: Peak) -> None:
    write_json(
        out / "run.json",
        {
            "config": job.cfg.model_dump(),
            "world_size": d.world_size,
            "device": device,
            "precision": job.loss.precision,
            "grad_accumulation": job.cfg.grad_accumulation(d.world_size),
            **job.info,
            "kernels": {**job.info.get("kernels", {}), "optimizer": optimizer_kernel},
            "peak_flops": {**peak.to_dict(), "processes": d.world_size, "total": peak.flops * d.world_size},
        },
    )


def _peak_text(peak: Peak) -> str:
    """Both peaks of the MFU denominator, per device, and which one is used."""

    def tflops(value: float | None) -> str:
        return "n/a" if value is None else f"{value / 1e12:,.1f}"

    return (
        f"{peak.name} ({peak.precision}): published {tflops(peak.published)}, measured {tflops(peak.measured)} "
        f"TFLOP/s per device ({peak.source} used)"
    )


def _step(run: _Run, state: TrainState, bar) -> None:
    """One optimizer step (or a skipped one), counted in ``state`` and logged."""
    job, d, device = run.job, run.d, run.device
    started = time.perf_counter()
    host = [next(job.reader) for _ in range(job.cfg.grad_accumulation(d.world_size))]
    counts = [job.counts(b) for b in host]  # on the host copies: no device sync
    batches = [to_device(b, device) for b in host]
    loss_value, norm, n_targets, n_tokens = _train_step(job, run.trained, batches, counts, run.optimizer, d, device)
    finite = math.isfinite(loss_value) and math.isfinite(norm)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used, read before the scheduler moves to the next one
    run.scheduler.step()
    state.record_step(n_tokens, n_targets, finite)
    elapsed = time.perf_counter() - started
    run.log.step(
        state.step,
        bar,
        loss=loss_value,
        lr=lr,
        grad_norm=norm,
        tok_s=n_tokens / elapsed,
        mfu=job.step_flops(n_tokens, n_targets) / elapsed / run.peak,
        tokens=state.tokens,
        targets=state.targets,
        skipped=not finite,
        every=job.cfg.log.every,
    )


def _after_step(run: _Run, state: TrainState) -> None:
    """Stop after too many skipped steps in a row; validate and checkpoint when due."""
    cfg, step = run.job.cfg, state.step
    if state.skipped_in_a_row >= cfg.training.max_consecutive_skips:
        raise StageFailed(
            f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
            f"(step {step}); stopping. Last good checkpoint: {run.checkpointer.latest(verify=False) or 'none'}. "
            "Lower optim.lr, raise schedule.warmup_steps or check the data."
        )
    last = step == cfg.training.steps
    if run.job.validation is not None and (step % cfg.eval.every == 0 or last):
        with run.memory.phase("train"):
            run.log.eval(step, run.job.validation.run(run.trained, run.job.loss, run.device, run.d))
    if step % cfg.checkpoint.every == 0 or last:
        with run.memory.phase("save"):
            run.checkpointer.save(state)


def _build(
    cfg: PretrainConfig, tokenizer_size: int, shard_vocab: int, d: distributed.Dist, device: str, precision: str
) -> tuple[nn.Module, NextTokenLoss, dict]:
    """The model prepared (:func:`medfoundry.train.model_setup.prepare_for_training`) and wrapped for the
    strategy; its loss; and the kernels chosen (recorded in run.json)."""
    meta = distributed.shards_on_meta(cfg.distributed.strategy, d)  # FSDP2: no process builds the whole model
    model = build_model(cfg, tokenizer_size, meta=meta)
    check_vocab(model, shard_vocab, cfg.data.tokenizer_dir)
    prepared = prepare_for_training(model, cfg.training, device=device, context=cfg.model.context, place=not meta)
    wrapped = distributed.wrap_model(prepared.model, cfg.distributed.strategy, device, d, precision)
    if meta:
        source = (
            pretrained_source(cfg.model.init_from, allow_pickle=cfg.model.allow_pickle)[0]
            if cfg.model.init_from
            else None
        )
        materialize(wrapped, device, source=source, seed=cfg.training.seed, d=d)
    return wrapped, NextTokenLoss(prepared.head, precision, device), prepared.kernels


def _train_step(
    job: Job, trained, batches: list, counts: list, optimizer, d: distributed.Dist, device: str
) -> tuple[float, float, float, float]:
    """Forward and backward over the step's micro-batches, then the update unless the loss or the
    gradient norm is not finite. Returns (mean loss over the global batch's targets, gradient norm,
    global targets, global tokens). Both values are the same on every process (an all-reduced loss;
    the norm of all-reduced or, under FSDP2, globally reduced gradients), so all processes skip or
    step together without another collective. The host waits for the device once per step (the loss
    and the norm read together, for the skip decision), never per micro-batch."""
    n_global, tokens_global = distributed.all_reduce_sums(
        [sum(c[0] for c in counts), sum(c[1] for c in counts)], d, device
    )
    scale = d.world_size / max(n_global, 1)  # DDP/FSDP average over processes
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        with distributed.gradient_sync(job.model, sync=i == len(batches) - 1):
            loss, _ = job.loss(trained, batch)
            (loss * scale).backward()
        loss_sum += loss.detach().double()
    distributed.all_reduce_(loss_sum, d)
    norm = grad_norm(job.model.parameters())
    loss_value, norm_value = torch.stack([loss_sum / max(n_global, 1), norm.detach().double()]).tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        clip_grads(job.model.parameters(), job.cfg.optim.grad_clip, norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, n_global, tokens_global


def _finish(job: Job, model: nn.Module, log: MetricsLog, out: Path, d: distributed.Dist, memory: PhaseMemory) -> dict:
    summary = log.summary()
    with memory.phase("export"):
        job.export(model, out / "model")  # every process: a sharded model is gathered a tensor at a time
    memory.write(out / "memory.json", d)
    if d.is_main:
        plot_losses(out / "metrics.jsonl", out / "plots" / "loss.png")
        write_json(out / "summary.json", summary)
    distributed.barrier(d)
    return summary if d.is_main else {}  # one report per run, not one per process
