"""``medfoundry finetune``: supervised fine-tuning on the pretraining engine.

The data are prepared once (:func:`medfoundry.sft.dataset.prepare`: templates, prompt-loss masks,
mixture, packing) into ``<output_dir>/data``; the model is loaded from a Hugging Face directory or a
GGUF file and its embeddings grown for tokens the template added; then :func:`medfoundry.train.loop.
train` runs exactly as for pretraining (precision, DDP/FSDP2, accumulation normalized by the global
number of response tokens, checkpoints, exact resume, metrics), with the batches of
:class:`~medfoundry.sft.dataset.SFTReader` and a loss over response tokens only. With ``lora`` only
low-rank adapters train (:mod:`medfoundry.train.lora`); the export merges them into a plain checkpoint.

The exported ``model/`` carries the tokenizer with its chat template, so ``medfoundry eval`` (prompt
style ``instruct``), ``generate``, ``chat`` and ``serve`` talk to the model in the format it learned.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from medfoundry.errors import ConfigError
from medfoundry.sft.batch import masked_token_loss, model_inputs, target_count
from medfoundry.sft.config import FinetuneConfig
from medfoundry.sft.dataset import PackedSplit, SFTData, prepare, validation_passes
from medfoundry.train import distributed, lora
from medfoundry.train.loop import Job, Loss, StepFlops, run_distributed, to_device
from medfoundry.train.losses import NextTokenLoss, linear_cross_entropy
from medfoundry.train.materialize import materialize, meta_model
from medfoundry.train.model_setup import (
    check_context,
    load_pretrained,
    prepare_for_training,
    pretrained_config,
    pretrained_source,
)


def finetune(cfg: FinetuneConfig) -> dict:
    """Prepare the data (process 0; the others wait), then train and export; returns the run's summary."""
    return run_distributed(cfg, _finetune_job)


class MaskedTokenLoss(NextTokenLoss):
    """Summed cross-entropy over the response tokens of a fine-tuning batch, and their number.

    With the fused output layer (the model called returns the final hidden states), only the hidden
    states of positions that predict a response token go through the output layer: with short answers
    after long prompts (PubMedQA: ~3 of ~400 tokens) that is most of the output layer's work saved.
    """

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        index = batch["target_index"]  # selected by index on the device: no host sync
        with self._autocast():
            if self.head is not None:
                hidden = model(**model_inputs(batch))[:, :-1].flatten(0, 1).index_select(0, index)
                targets = batch["labels"][:, 1:].flatten().index_select(0, index)
                return linear_cross_entropy(hidden, self.head.weight, targets), index.numel()
            logits = model(**model_inputs(batch), use_cache=False).logits  # training fills no KV cache
        return masked_token_loss(logits, batch["labels"]), index.numel()


class SFTValidation:
    """Loss on the held-out sequences of every source (the same ones each time, at most ``batches``
    micro-batches per source): ``val_loss`` over all, ``val_loss/<source>`` each."""

    def __init__(self, split: PackedSplit, micro: int, batches: int, d: distributed.Dist):
        self.split, self.micro = split, micro
        self.plan = {}
        for source in split.sources:
            passes = min(validation_passes(split, micro, d.world_size, source), batches)
            mine = split.rows_for(source)[: passes * micro * d.world_size][d.rank :: d.world_size]
            if passes:
                self.plan[source] = (passes, mine)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, loss_fn: Loss, device: str, d: distributed.Dist) -> dict[str, float]:
        model.eval()
        totals = {}
        for source, (passes, rows) in self.plan.items():
            loss_sum, count = 0.0, 0
            for p in range(passes):
                chunk = rows[p * self.micro : (p + 1) * self.micro]
                # a process with fewer rows keeps step with the others (FSDP all-gathers); not counted
                batch = to_device(self.split.batch(chunk if len(chunk) else rows[:1]), device)
                loss, n = loss_fn(model, batch)
                if len(chunk):
                    loss_sum, count = loss_sum + loss.item(), count + n
            totals[source] = (
                distributed.all_reduce_sum(loss_sum, d, device),
                distributed.all_reduce_sum(count, d, device),
            )
        model.train()
        loss_all, count_all = sum(s for s, _ in totals.values()), sum(n for _, n in totals.values())
        metrics = {"val_loss": loss_all / max(count_all, 1), "val_ppl": math.exp(min(loss_all / max(count_all, 1), 50))}
        metrics.update({f"val_loss/{source}": s / max(n, 1) for source, (s, n) in totals.items()})
        return metrics


def _prepared(cfg: FinetuneConfig, d: distributed.Dist) -> SFTData:
    """The prepared data, written by process 0 (reused when config and inputs are unchanged)."""
    path = cfg.prepared_path()
    if d.is_main:
        manifest = prepare(cfg.data_config(), path)
        counts = manifest.details["splits"]
        print(
            f"finetune: data: {counts['train']['examples']:,} train examples in {counts['train']['rows']:,} sequences "
            f"({counts['train']['response_tokens']:,} response tokens), {counts['val']['rows']:,} validation "
            f"sequences -> {path}",
            flush=True,
        )
    distributed.barrier(d)
    return SFTData(path)


def _resolve_steps(cfg: FinetuneConfig, data: SFTData) -> FinetuneConfig:
    """``training.epochs`` as optimizer steps over the prepared train sequences."""
    if cfg.training.steps is not None:
        return cfg
    rows = data.split("train").n_rows
    steps = max(1, math.ceil(cfg.training.epochs * rows / cfg.training.global_batch_size))
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": steps})})


def _load_base(cfg: FinetuneConfig, tokenizer_dir: Path, max_length: int, meta: bool) -> torch.nn.Module:
    """The model to fine-tune; with ``meta``, without storage (each process loads its shards after sharding)."""
    from medfoundry.model.resize import resize_for_tokenizer

    if meta:
        model = meta_model(pretrained_config(cfg.model.init_from, allow_pickle=cfg.model.allow_pickle))
    else:
        model = load_pretrained(cfg.model.init_from, allow_pickle=cfg.model.allow_pickle)
    resize_for_tokenizer(model, tokenizer_dir)
    check_context(model.config, max_length, "data.max_length")
    return model


def _finetune_job(cfg: FinetuneConfig, d: distributed.Dist, device: str, precision: str) -> Job:
    data = _prepared(cfg, d)
    cfg = _resolve_steps(cfg, data)
    max_length = data.manifest["max_length"]
    # FSDP2 builds on the meta device and loads each process's shards; LoRA's adapters are initialized
    # by peft on a model in memory, so LoRA runs build the model whole (the base is frozen and small
    # next to the optimizer state a full fine-tune shards)
    meta = distributed.shards_on_meta(cfg.distributed.strategy, d) and cfg.lora is None
    prepared = prepare_for_training(
        _load_base(cfg, data.tokenizer_dir, max_length, meta),
        cfg.training,
        device=device,
        context=max_length,
        lora=cfg.lora,
        added_ids=data.manifest["tokenizer"]["added_ids"],
        place=not meta,
    )
    attention = prepared.kernels["attention"]
    dtype = cfg.export.torch_name(precision)
    if data.manifest["packing"] and attention not in ("eager", "sdpa"):
        raise ConfigError(
            f"{type(prepared.lm).__name__} uses its own {attention!r} attention, which ignores the block-causal "
            "masks of packed sequences: set data.packing: false"
        )
    model = distributed.wrap_model(prepared.model, cfg.distributed.strategy, device, d, precision)
    if meta:
        source = pretrained_source(cfg.model.init_from, allow_pickle=cfg.model.allow_pickle)[0]
        materialize(model, device, source=source, seed=cfg.training.seed, d=d)
    reader = data.reader(cfg.training.micro_batch_size, rank=d.rank, world_size=d.world_size, seed=cfg.training.seed)
    val = data.split("val")
    validation = SFTValidation(val, cfg.training.micro_batch_size, cfg.eval.batches, d) if val.n_rows else None
    info = {
        "kernels": prepared.kernels,
        "data": {"dir": str(data.directory), "fingerprint": data.fingerprint},
        "steps": cfg.training.steps,
        **({"lora": lora.describe(prepared.lm)} if cfg.lora is not None else {}),
    }
    return Job(
        cfg=cfg,
        model=model,
        loss=MaskedTokenLoss(prepared.head, precision, device),
        reader=reader,
        counts=_counts,
        validation=validation,
        export=lambda m, out: _export(m, out, cfg, data, d, device, dtype),
        describe=None if cfg.lora is not None else lambda out: _describe(prepared.lm, out, data, dtype),
        step_flops=_step_flops(prepared.lm, max_length, fused=prepared.head is not None),
        info=info,
    )


def _step_flops(model: torch.nn.Module, context: int, fused: bool) -> StepFlops:
    """Model FLOPs of a step: with the fused loss the output layer runs only at positions that predict a
    response token (``targets``), not at every token."""
    from medfoundry.model.presets import flops_per_token

    per_token = flops_per_token(model.config, context)
    head = 6.0 * model.get_output_embeddings().weight.numel() if fused else 0.0
    return lambda tokens, targets: tokens * (per_token - head) + targets * head


def _counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(response tokens that carry loss, tokens of the examples: padding excluded)."""
    return target_count(batch), int(batch["tokens"])


def _export(
    model: torch.nn.Module, out: Path, cfg: FinetuneConfig, data: SFTData, d: distributed.Dist, device: str, dtype: str
) -> None:
    """The fine-tuned model (every process calls it): under LoRA the adapter, and the merged model unless
    ``lora.merge`` is off; otherwise the model, gathered a tensor at a time when sharded."""
    from medfoundry.model.export import export_hf

    if cfg.lora is None:
        distributed.export_on_main(
            model, d, device, lambda weights: export_hf(weights, data.tokenizer_dir, out, dtype=dtype)
        )
        return
    plain = distributed.unsharded_copy(model) if distributed.is_sharded(model) else distributed.unwrap(model)
    if not d.is_main:
        return
    lora.save_adapter(plain, out.parent / "adapter", data.tokenizer_dir)
    if cfg.lora.merge:
        export_hf(lora.merged(plain), data.tokenizer_dir, out, dtype=dtype)


def _describe(lm: torch.nn.Module, out: Path, data: SFTData, dtype: str) -> None:
    from medfoundry.model.export import Weights, export_hf

    export_hf(Weights.describing(lm), data.tokenizer_dir, out, dtype=dtype)
