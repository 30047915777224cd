"""``medfoundry plan``: what a training run costs, before it starts.

The model is built on the meta device (no memory, no weights read) exactly as ``medfoundry pretrain`` or
``medfoundry finetune`` would build it, then:

- parameters: all of them (a tied output layer counted once), the embedding tables', the rest, and the
  trainable ones (LoRA adapters only under ``lora``);
- tokens ``D`` = steps x global batch x context (fine-tuning by epochs: unknown until the data are prepared);
- training FLOPs ``6 N D``, and ``flops_per_token x D`` with the attention term
  (:func:`medfoundry.model.presets.flops_per_token`, the FLOPs the training loop's ``mfu`` metric counts);
- memory per GPU: fp32 weights (4 B/param), fp32 gradients (4) and AdamW's two fp32 moments (8) under
  bf16 autocast, divided as the sharding divides them, plus the activations of one micro-batch
  (Korthikanti et al. 2022, 16-bit activations: ``34 s b h`` bytes a layer, and ``5 a s^2 b`` more with
  eager attention, which stores the scores; with activation checkpointing each layer keeps only its
  input, ``2 s b h``, and one layer is recomputed at a time), the bf16 copies of the weights that autocast's
  matmuls keep for backward (2 B per layer parameter) and the loss's logits;
- wall-clock days and GPU-hours at the stated MFU (of the peak dense bf16 FLOP/s), and energy as the
  GPUs' TDP x GPU-hours (an upper bound for the GPUs alone: no host, network or cooling).

Planned hardware comes from the recipe's ``plan:`` section (:class:`PlanSection`), then CLI flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from medfoundry.config import StrictModel, apply_overrides, load_yaml, validate
from medfoundry.errors import ConfigError

if TYPE_CHECKING:  # torch and the training configs are imported when a plan is made, not when the CLI starts
    from medfoundry.sft.config import FinetuneConfig
    from medfoundry.train.config import PretrainConfig

GIB = 1 << 30


@dataclass(frozen=True)
class Accelerator:
    peak_tflops: float  # dense bf16, no sparsity
    memory_gib: float
    tdp_watts: float | None


# NVIDIA datasheets: A100 SXM 312 TFLOP/s bf16 dense, 400 W; H100 SXM 989 TFLOP/s bf16 dense, 700 W
GPUS: dict[str, Accelerator] = {
    "a100-40gb": Accelerator(312.0, 40.0, 400.0),
    "a100-80gb": Accelerator(312.0, 80.0, 400.0),
    "h100-80gb": Accelerator(989.0, 80.0, 700.0),
}
CPU = "cpu"  # this machine: peak measured with medfoundry.train.metrics.peak_flops, memory = its RAM

Sharding = Literal["ddp", "zero1", "zero2", "fsdp"]
SHARDING_NAMES = {
    "ddp": "DDP, nothing sharded",
    "zero1": "ZeRO-1, optimizer states sharded",
    "zero2": "ZeRO-2, optimizer states and gradients sharded",
    "fsdp": "FSDP, ZeRO-3 full sharding",
}
BYTES_PER_PARAMETER = {"weights": 4, "gradients": 4, "adam": 8}  # fp32 weights, fp32 grads, fp32 m and v
USABLE_MEMORY = 0.9  # the rest: CUDA context, communication buffers, allocator fragmentation


class PlanSection(StrictModel):
    """A recipe's ``plan:`` section: the hardware it targets."""

    gpu: str = Field("a100-80gb", description=f"one of {', '.join(GPUS)}, or cpu (this machine, measured)")
    gpus: int = Field(1, gt=0, description="number of GPUs (data-parallel processes)")
    mfu: float = Field(0.4, gt=0, le=1, description="assumed model FLOPs utilization")
    sharding: Sharding | None = Field(None, description="default: the training config's distributed.strategy")
    activation_checkpointing: bool | None = Field(None, description="default: the training config's")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, gpu: str) -> str:
        known = [*GPUS, CPU]
        if gpu not in known:
            close = difflib.get_close_matches(gpu, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown GPU {gpu!r}; {hint}known: {', '.join(known)}")
        return gpu


@dataclass
class Target:
    """The training stage to plan, with what the recipe around it tells about its model."""

    source: str
    stage: Literal["pretrain", "finetune"]
    cfg: PretrainConfig | FinetuneConfig
    plan: PlanSection
    tokenizer_vocab: int | None = None  # the recipe's tokenizer stage's vocab_size
    pretrain: PretrainConfig | None = None  # the recipe's pretrain stage, which a finetune stage continues


@dataclass
class ModelPlan:
    source: str
    model_type: str
    layers: int
    hidden_size: int
    heads: int
    vocab_size: int
    context: int
    attention: str
    loss: str
    parameters: int
    embedding_parameters: int
    non_embedding_parameters: int
    trainable_parameters: int
    flops_per_token: float


@dataclass
class MemoryPlan:
    sharding: str
    precision: str
    bytes_per_parameter: dict
    states_gib: float
    micro_batch_size: int
    grad_accumulation: int
    activation_checkpointing: bool
    activations_gib: float
    activations_checkpointed_gib: float
    weight_copies_gib: float
    logits_gib: float
    total_gib: float
    memory_gib: float
    fits: bool


@dataclass
class Plan:
    source: str
    stage: str
    model: ModelPlan
    steps: int | None
    global_batch_size: int
    tokens: int | None
    tokens_note: str | None
    flops_6nd: float | None
    flops: float | None
    gpu: str
    gpus: int
    peak_tflops: float
    tdp_watts: float | None
    mfu: float
    memory: MemoryPlan
    days: float | None
    gpu_hours: float | None
    energy_kwh: float | None
    implied_mfu: float | None = None
    implied_mfu_6nd: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- input


def load_target(path: str | Path, overrides: list[str] | None = None, stage: str | None = None) -> Target:
    """A recipe (``stages:``) or a plain pretrain / finetune config, with ``--set`` overrides applied."""
    tree = apply_overrides(load_yaml(path), overrides or [])
    if "stages" in tree:
        return _recipe_target(tree, str(path), stage)
    if stage is not None:
        raise ConfigError(f"--stage {stage}: {path} is a single {_plain_stage(tree)} config, not a recipe")
    from medfoundry.sft.config import FinetuneConfig
    from medfoundry.train.config import PretrainConfig

    plain = _plain_stage(tree)
    model = PretrainConfig if plain == "pretrain" else FinetuneConfig
    return Target(str(path), plain, validate(model, tree, str(path)), PlanSection())


def _plain_stage(tree: dict) -> str:
    """A finetune config's data has instruction ``sources``; a pretrain config's has ``tokens_dir``."""
    data = tree.get("data")
    return "finetune" if isinstance(data, dict) and "sources" in data else "pretrain"


def _recipe_target(tree: dict, source: str, stage: str | None) -> Target:
    from medfoundry.recipe.config import RecipeConfig, wire

    recipe = validate(RecipeConfig, tree, source)
    configs = wire(recipe)
    trained = [s for s in ("pretrain", "finetune") if s in configs]
    if not trained:
        raise ConfigError(f"{source}: the recipe has no pretrain or finetune stage to plan")
    chosen = stage or trained[0]
    if chosen not in configs:
        raise ConfigError(f"--stage {chosen}: {source} has no stages.{chosen} (it has {', '.join(trained)})")
    plan = validate(PlanSection, recipe.plan or {}, f"{source}: plan")
    vocab = configs["tokenizer"].vocab_size if "tokenizer" in configs else None
    return Target(source, chosen, configs[chosen], plan, tokenizer_vocab=vocab, pretrain=configs.get("pretrain"))


def with_flags(target: Target, **flags) -> Target:
    """The plan section with the CLI flags that were given (``None`` = not given) laid over it."""
    given = {k: v for k, v in flags.items() if v is not None}
    plan = validate(PlanSection, {**target.plan.model_dump(exclude_none=True), **given}, "command-line flags")
    return dataclasses.replace(target, plan=plan)


def add_arguments(command: argparse.ArgumentParser) -> None:
    """The flags of ``medfoundry plan`` (the config and ``--set`` come from the CLI's config-command helper)."""
    command.add_argument(
        "--stage",
        choices=["pretrain", "finetune"],
        help="which stage of a recipe to plan (default: pretrain when the recipe has one)",
    )
    command.add_argument("--gpu", help=f"{', '.join(GPUS)} or {CPU} (default: the recipe's plan.gpu)")
    command.add_argument("--gpus", type=int, help="number of GPUs (default: the recipe's plan.gpus)")
    command.add_argument("--mfu", type=float, help="assumed model FLOPs utilization, e.g. 0.4 (default: plan.mfu)")
    command.add_argument(
        "--sharding",
        choices=list(SHARDING_NAMES),
        help="default: plan.sharding, else the training config's distributed.strategy",
    )
    command.add_argument("--days", type=float, help="a known wall-clock duration: also report the MFU it implies")
    command.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


# ---------------------------------------------------------------------------------------------- model


def _checkpoint_config(init_from: str):
    """The config of an HF checkpoint directory or a .gguf file, or None when it is not here (yet)."""
    from transformers import AutoConfig

    from medfoundry.model.load import is_gguf

    path = Path(init_from)
    if is_gguf(path) and path.is_file():
        return AutoConfig.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
        )
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    return None


def _has_tokenizer(directory: str | None) -> bool:
    """Whether ``directory`` holds a tokenizer training would read (it may not be downloaded or built yet)."""
    path = Path(directory or "")
    return bool(directory) and ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file())


def _tokenizer_size(tokenizer_dir: str | None) -> int | None:
    if not _has_tokenizer(tokenizer_dir):
        return None
    from medfoundry.model.load import load_backend_tokenizer

    return load_backend_tokenizer(Path(tokenizer_dir)).get_vocab_size(with_added_tokens=True)


def _pretrain_config(cfg: PretrainConfig, tokenizer_vocab: int | None):
    """(transformers config, where it came from) as ``build_model`` makes it: a checkpoint's own config
    when continuing (its preset stands in while the checkpoint is not downloaded), else the preset with
    the context, the overrides and the tokenizer's vocabulary (the tokenizer on disk, else the recipe's
    tokenizer stage's vocab_size, else the preset's)."""
    from medfoundry.model.presets import model_config

    m = cfg.model
    if m.init_from:
        config = _checkpoint_config(m.init_from)
        if config is not None:
            return config, f"checkpoint {m.init_from}"
        return model_config(m.preset), f"preset {m.preset} (standing in for {m.init_from}, not found here)"
    vocab = _tokenizer_size(cfg.data.tokenizer_dir) or tokenizer_vocab
    return (
        model_config(m.preset, vocab_size=vocab, context=m.context, overrides=m.overrides),
        f"preset {m.preset}" + (f", vocabulary {vocab:,}" if vocab else ""),
    )


def _model_config(target: Target):
    cfg = target.cfg
    if target.stage == "pretrain":
        return _pretrain_config(cfg, target.tokenizer_vocab)
    config = _checkpoint_config(cfg.model.init_from)
    if config is not None:
        return config, f"checkpoint {cfg.model.init_from}"
    if target.pretrain is not None:
        config, source = _pretrain_config(target.pretrain, target.tokenizer_vocab)
        return config, f"the pretrain stage's model: {source}"
    raise ConfigError(
        f"{target.source}: model.init_from: {cfg.model.init_from} is neither a Hugging Face checkpoint "
        "directory (config.json) nor a .gguf file here: download the base model first"
    )


def _tokenizer_dir(target: Target) -> str:
    data = target.cfg.data
    return data.tokenizer_dir if target.stage == "pretrain" else data.tokenizer or target.cfg.model.init_from


def context_of(target: Target) -> int:
    """The training sequence length: pretraining's model.context, fine-tuning's data.max_length."""
    return target.cfg.model.context if target.stage == "pretrain" else target.cfg.data.max_length


def build_meta_model(target: Target, device: str):
    """(model on the meta device, config source, attention kernel, loss kind), prepared as training prepares it."""
    import torch
    from transformers import AutoModelForCausalLM

    from medfoundry.model.resize import resize_for_tokenizer
    from medfoundry.train.model_setup import check_context, prepare_for_training

    config, source = _model_config(target)
    cfg = target.cfg
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if _has_tokenizer(_tokenizer_dir(target)):  # an extended tokenizer grows the embeddings, as in training
        resize_for_tokenizer(model, _tokenizer_dir(target))
    try:
        check_context(
            model.config, context_of(target), "model.context" if target.stage == "pretrain" else "data.max_length"
        )
    except ConfigError as exc:
        raise ConfigError(f"{target.source} ({target.stage} stage): {exc}") from None
    lora = cfg.lora if target.stage == "finetune" else None
    prepared = prepare_for_training(
        model, cfg.training, device=device, context=context_of(target), lora=lora, place=False
    )
    return prepared.lm, source, prepared.kernels["attention"], prepared.kernels["loss"]


def _embedding_parameters(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))


def model_plan(target: Target, device: str) -> ModelPlan:
    from medfoundry.model.presets import flops_per_token

    model, source, attention, loss = build_meta_model(target, device)
    config = model.config
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    embedding = _embedding_parameters(model)
    context = context_of(target)
    return ModelPlan(
        source=source,
        model_type=config.model_type,
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        context=context,
        attention=attention,
        loss=loss,
        parameters=total,
        embedding_parameters=embedding,
        non_embedding_parameters=total - embedding,
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        flops_per_token=flops_per_token(config, context),
    )


# ---------------------------------------------------------------------------------------------- costs


def training_precision(gpu: str, choice: str) -> str:
    """bf16 or fp32, as the runtime decides: ``auto`` is bf16 on the GPUs of the table, and on CPUs that have it."""
    if gpu != CPU:
        return "fp32" if choice == "fp32" else "bf16"
    from medfoundry.runtime import resolve_device_precision

    return "bf16" if resolve_device_precision("cpu", choice)[1] == "bf16" else "fp32"


def accelerator(gpu: str, precision: str) -> Accelerator:
    """The table's entry, or this machine's CPU: peak measured in the training precision, memory = RAM."""
    if gpu != CPU:
        return GPUS[gpu]
    from medfoundry.train.metrics import peak_flops

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Accelerator(peak_flops("cpu", precision) / 1e12, ram / GIB, None)


def state_bytes(parameters: int, trainable: int, sharding: str, gpus: int) -> float:
    """Weights, gradients and AdamW moments on one GPU (:data:`BYTES_PER_PARAMETER`; frozen weights have neither
    gradients nor moments). ZeRO-1 shards the moments, ZeRO-2 also the gradients, FSDP (ZeRO-3) everything."""
    b = BYTES_PER_PARAMETER
    weights, grads, adam = parameters * b["weights"], trainable * b["gradients"], trainable * b["adam"]
    sharded = {"ddp": 0.0, "zero1": adam, "zero2": grads + adam, "fsdp": weights + grads + adam}[sharding]
    return weights + grads + adam - sharded + sharded / gpus


def layer_activation_bytes(m: ModelPlan, micro_batch: int) -> float:
    """One layer's saved activations for backward, 16-bit (Korthikanti et al. 2022, eq. 2, no parallelism):
    ``34 s b h``, plus ``5 a s^2 b`` for the attention scores, softmax and its dropout mask where the kernel
    stores them (eager attention; SDPA's flash / memory-efficient kernels recompute them)."""
    s, b, h, a = m.context, micro_batch, m.hidden_size, m.heads
    scores = 5 * a * s * s * b if m.attention == "eager" else 0
    return 34 * s * b * h + scores


def activation_bytes(m: ModelPlan, micro_batch: int, checkpointing: bool) -> float:
    """Without checkpointing every layer keeps its activations; with it each keeps its input (``2 s b h``)
    and one layer's activations exist at a time, while it is recomputed."""
    layer = layer_activation_bytes(m, micro_batch)
    if not checkpointing:
        return m.layers * layer
    return m.layers * 2 * m.context * micro_batch * m.hidden_size + layer


def weight_copy_bytes(m: ModelPlan, checkpointing: bool, precision: str) -> float:
    """Under bf16 autocast each matmul casts its fp32 weight to bf16 and keeps the copy for backward (2 B per
    layer parameter, unsharded even under FSDP): every layer's until backward, or one layer's at a time with
    activation checkpointing."""
    if precision != "bf16":
        return 0.0
    copies = 2.0 * m.non_embedding_parameters
    return copies / m.layers if checkpointing else copies


def logits_bytes(m: ModelPlan, micro_batch: int) -> float:
    """The loss's [tokens x vocabulary] tensors: ``plain`` keeps about four fp32 ones (logits, their fp32 copy,
    log-probabilities, gradient); ``chunked`` one bf16 buffer of at most GROUP_ELEMENTS logits."""
    from medfoundry.train.losses import GROUP_ELEMENTS

    logits = m.context * micro_batch * m.vocab_size
    return 16 * logits if m.loss == "plain" else 2 * min(logits, GROUP_ELEMENTS)


def memory_plan(m: ModelPlan, target: Target, hw: Accelerator, precision: str) -> MemoryPlan:
    cfg, plan = target.cfg, target.plan
    sharding = plan.sharding or ("fsdp" if cfg.distributed.strategy == "fsdp" else "ddp")
    checkpointing = (
        cfg.training.activation_checkpointing
        if plan.activation_checkpointing is None
        else plan.activation_checkpointing
    )
    micro = cfg.training.micro_batch_size
    try:
        accumulation = cfg.grad_accumulation(plan.gpus)
    except ConfigError as exc:
        raise ConfigError(
            f"{target.source} ({target.stage} stage): {exc} (processes: plan.gpus / --gpus {plan.gpus})"
        ) from None
    states = state_bytes(m.parameters, m.trainable_parameters, sharding, plan.gpus)
    full, ckpt = activation_bytes(m, micro, False), activation_bytes(m, micro, True)
    copies, logits = weight_copy_bytes(m, checkpointing, precision), logits_bytes(m, micro)
    total = states + (ckpt if checkpointing else full) + copies + logits
    return MemoryPlan(
        sharding=sharding,
        precision=precision,
        bytes_per_parameter=dict(BYTES_PER_PARAMETER),
        states_gib=states / GIB,
        micro_batch_size=micro,
        grad_accumulation=accumulation,
        activation_checkpointing=checkpointing,
        activations_gib=full / GIB,
        activations_checkpointed_gib=ckpt / GIB,
        weight_copies_gib=copies / GIB,
        logits_gib=logits / GIB,
        total_gib=total / GIB,
        memory_gib=hw.memory_gib,
        fits=total <= USABLE_MEMORY * hw.memory_gib * GIB,
    )


def token_count(target: Target) -> tuple[int | None, str | None]:
    """(tokens, note): steps x global batch x context; fine-tuning sequences hold at most max_length tokens."""
    t = target.cfg.training
    if t.steps is None:
        return None, (
            f"training.epochs ({t.epochs}): the tokens depend on the prepared data; "
            "give training.steps (--set training.steps=N) to plan time and energy"
        )
    tokens = t.steps * t.global_batch_size * context_of(target)
    note = None if target.stage == "pretrain" else "at most: packed sequences may be shorter than max_length"
    return tokens, note


def seconds_for(flops: float, gpus: int, hw: Accelerator, mfu: float) -> float:
    return flops / (gpus * hw.peak_tflops * 1e12 * mfu)


def make_plan(target: Target, days: float | None = None) -> Plan:
    """The plan of ``target``; with ``days`` (a known wall-clock), also the MFU that duration implies."""
    cfg, p = target.cfg, target.plan
    precision = training_precision(p.gpu, cfg.training.precision)
    hw = accelerator(p.gpu, precision)
    model = model_plan(target, "cpu" if p.gpu == CPU else "cuda")
    memory = memory_plan(model, target, hw, precision)
    tokens, note = token_count(target)
    flops = None if tokens is None else model.flops_per_token * tokens
    flops_6nd = None if tokens is None else 6.0 * model.parameters * tokens
    seconds = None if flops is None else seconds_for(flops, p.gpus, hw, p.mfu)
    gpu_hours = None if seconds is None else seconds * p.gpus / 3600
    plan = Plan(
        source=target.source,
        stage=target.stage,
        model=model,
        steps=cfg.training.steps,
        global_batch_size=cfg.training.global_batch_size,
        tokens=tokens,
        tokens_note=note,
        flops_6nd=flops_6nd,
        flops=flops,
        gpu=p.gpu,
        gpus=p.gpus,
        peak_tflops=hw.peak_tflops,
        tdp_watts=hw.tdp_watts,
        mfu=p.mfu,
        memory=memory,
        days=None if seconds is None else seconds / 86400,
        gpu_hours=gpu_hours,
        energy_kwh=None if gpu_hours is None or hw.tdp_watts is None else gpu_hours * hw.tdp_watts / 1e3,
    )
    if days is not None:
        if flops is None:
            raise ConfigError(f"--days: {note}")
        available = p.gpus * hw.peak_tflops * 1e12 * days * 86400
        plan.implied_mfu, plan.implied_mfu_6nd = flops / available, flops_6nd / available
    return plan


# ---------------------------------------------------------------------------------------------- report


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:,.0f}"


def _num(x: float) -> str:
    """Three significant digits, without an exponent for everyday sizes."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _gib(x: float) -> str:
    return f"{_num(x)} GiB"


def _duration(seconds: float) -> str:
    for unit, length in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= length:
            return f"{_num(seconds / length)} {unit}"
    return f"{_num(seconds)} seconds"


def _model_rows(plan: Plan) -> list[list[str]]:
    m = plan.model
    trainable = f"; trainable {_count(m.trainable_parameters)}" if m.trainable_parameters != m.parameters else ""
    if plan.tokens is None:
        tokens = plan.tokens_note
    else:
        tokens = (
            f"{_count(plan.tokens)} = {plan.steps:,} steps x {plan.global_batch_size:,} sequences x {m.context:,}"
            + (f" ({plan.tokens_note})" if plan.tokens_note else "")
        )
    return [
        ["plan", f"{plan.source} ({plan.stage} stage)"],
        ["model", f"{m.model_type} from {m.source}"],
        [
            "shape",
            f"{m.layers} layers, hidden {m.hidden_size:,}, {m.heads} heads, vocabulary {m.vocab_size:,}, "
            f"context {m.context:,}; {m.attention} attention, {m.loss} loss",
        ],
        [
            "parameters",
            f"{_count(m.parameters)} ({m.parameters:,}); non-embedding {_count(m.non_embedding_parameters)}, "
            f"embedding tables {_count(m.embedding_parameters)}{trainable}",
        ],
        ["tokens", tokens],
    ]


def _memory_rows(plan: Plan) -> list[list[str]]:
    m, mem = plan.model, plan.memory
    per_param = "+".join(str(v) for v in mem.bytes_per_parameter.values())
    frozen = ", frozen weights 4" if m.trainable_parameters != m.parameters else ""
    copies = (
        f"{_gib(mem.weight_copies_gib)} bf16 weight copies kept for backward (autocast)"
        if mem.precision == "bf16"
        else "fp32: no weight copies"
    )
    verdict = "fits" if mem.fits else f"DOES NOT FIT (over {USABLE_MEMORY:.0%} of memory)"
    return [
        [
            "sharding",
            f"{mem.sharding} ({SHARDING_NAMES[mem.sharding]}); micro-batch {mem.micro_batch_size} x "
            f"{mem.grad_accumulation} accumulation step(s) x {plan.gpus} GPUs",
        ],
        [
            "memory/GPU",
            f"{_gib(mem.states_gib)} weights + gradients + AdamW "
            f"({per_param} = {sum(mem.bytes_per_parameter.values())} B/param{frozen}; {mem.sharding})",
        ],
        [
            "",
            f"{_gib(mem.activations_gib)} activations without checkpointing, {_gib(mem.activations_checkpointed_gib)} "
            f"with (using {'with' if mem.activation_checkpointing else 'without'})",
        ],
        ["", f"{copies}, {_gib(mem.logits_gib)} logits ({m.loss} loss)"],
        ["", f"{_gib(mem.total_gib)} of {mem.memory_gib:,.0f} GiB: {verdict}"],
    ]


def _cost_rows(plan: Plan) -> list[list[str]]:
    tdp = f", {plan.tdp_watts:,.0f} W TDP" if plan.tdp_watts else ""
    rows = [
        [
            "hardware",
            f"{plan.gpus} x {plan.gpu} ({_num(plan.peak_tflops)} TFLOP/s peak, "
            f"{plan.memory.memory_gib:,.0f} GiB{tdp}) at {plan.mfu:.1%} MFU",
        ]
    ]
    if plan.flops is not None:
        rows.append(
            [
                "training FLOPs",
                f"{plan.flops_6nd:.3g} (6·N·D); {plan.flops:.3g} with attention "
                f"({plan.model.flops_per_token:.3g} per token: 6·N_matmul + 12·L·H·T)",
            ]
        )
    if plan.days is not None:
        rows.append(["time", f"{_duration(plan.days * 86400)} wall-clock, {_num(plan.gpu_hours)} GPU-hours"])
        rows.append(
            [
                "energy",
                f"{_num(plan.energy_kwh)} kWh ({plan.tdp_watts:,.0f} W TDP x GPU-hours; GPUs only)"
                if plan.energy_kwh is not None
                else "n/a (no TDP for this device)",
            ]
        )
    if plan.implied_mfu is not None:
        rows.append(["implied MFU", f"{plan.implied_mfu:.1%} (6·N·D alone: {plan.implied_mfu_6nd:.1%})"])
    return rows


def table_rows(plan: Plan) -> list[list[str]]:
    """``[label, value]`` rows of the human-readable plan."""
    return _model_rows(plan) + _cost_rows(plan) + _memory_rows(plan)
