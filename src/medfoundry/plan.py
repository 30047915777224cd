"""``medfoundry plan``: what a training run costs, before it starts.

The model is built on the meta device (no memory, no weights read) exactly as ``medfoundry pretrain`` or
``medfoundry finetune`` would build it, then, for the engine as it runs that configuration (:class:`Engine`:
one process, DDP or FSDP2; bf16 or fp32):

- parameters: all of them (a tied output layer counted once), the embedding tables', the rest, and the
  trainable ones (LoRA adapters only under ``lora``); per transformer block and outside the blocks (the
  units FSDP2 shards and gathers);
- tokens ``D`` = steps x global batch x context (fine-tuning by epochs: unknown until the data are prepared);
- training FLOPs ``6 N D``, and ``flops_per_token x D`` with the attention term
  (:func:`medfoundry.model.presets.flops_per_token`, the FLOPs the training loop's ``mfu`` metric counts);
  under activation checkpointing also the FLOPs executed, with every block's forward run again in backward;
- memory per GPU: fp32 master weights (4 B/param), fp32 gradients (4) and AdamW's two fp32 moments (8),
  all of it on every GPU under DDP (plus DDP's fp32 all-reduce buckets, another 4), 1/N of it under
  FSDP2; the activations of one micro-batch (Korthikanti et al. 2022: ``34 s b h`` bytes a layer in
  16 bits, and ``5 a s^2 b`` more with eager attention; with activation checkpointing each block keeps
  only its input and one block is recomputed at a time); the weights the forward pass reads in bf16
  (autocast's cached copies over fp32 weights, or FSDP2's all-gathered bf16 blocks and root) and FSDP2's
  gradient reduce-scatter buffers; and the loss's buffers;
- checkpoints (``torch.distributed.checkpoint``: each rank writes its own shard), host memory per rank at
  model creation and while saving, and the exported model's size;
- wall-clock days and GPU-hours at the stated MFU (of the peak dense bf16 FLOP/s), and energy as the
  GPUs' TDP x GPU-hours (an upper bound for the GPUs alone: no host, network or cooling).

Planned hardware comes from the recipe's ``plan:`` section (:class:`PlanSection`; its GPU count defaults
to the recipe's ``distributed:`` launch, nnodes x nproc_per_node), then CLI flags.
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
from medfoundry.errors import ConfigError, InputError

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

# the strategies of medfoundry.train.distributed.wrap_model
Sharding = Literal["ddp", "fsdp"]
SHARDING_NAMES = {
    "ddp": "DDP: every GPU holds all the states",
    "fsdp": "FSDP2: fully_shard per block, then the root; states 1/N",
}
ONE_PROCESS = "one process: nothing wrapped, nothing sharded"
BYTES_PER_PARAMETER = {"weights": 4, "gradients": 4, "adam": 8}  # fp32 weights, fp32 grads, fp32 m and v
# a DCP checkpoint: the fp32 master weights (all of them) and AdamW's exp_avg and exp_avg_sq (trainable ones)
CHECKPOINT_BYTES_PER_PARAMETER = {"weights": 4, "adam": 8}
# torch's DistributedDataParallel as wrap_model builds it (gradient_as_bucket_view=False, the default) keeps
# its flat fp32 all-reduce buckets beside the gradients: another 4 bytes per trainable parameter
DDP_BUCKET_BYTES = 4
REDUCE_BYTES = 4  # FSDP2's reduce_dtype (fp32), DDP's all-reduce: gradients are reduced in fp32
USABLE_MEMORY = 0.9  # the rest: CUDA context, NCCL buffers, allocator fragmentation


class PlanSection(StrictModel):
    """A recipe's ``plan:`` section: the hardware it targets."""

    gpu: str = Field("a100-80gb", description=f"one of {', '.join(GPUS)}, or cpu (this machine, measured)")
    gpus: int = Field(
        1, gt=0, description="number of GPUs (data-parallel processes); default: the recipe's distributed launch"
    )
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
    # what FSDP2 shards and gathers, and what autocast casts
    layer_parameters: int  # one transformer block's (the largest)
    layer_trainable_parameters: int
    root_parameters: int  # outside the blocks (embeddings, final norm, an untied head): FSDP2's root unit
    matmul_parameters: int  # weights and biases of the matmul layers the model's forward runs (Linear, Conv1D)
    trainable_matmul_parameters: int
    layer_matmul_parameters: int
    recompute_flops_per_token: float  # the blocks' forward again, under activation checkpointing


@dataclass(frozen=True)
class Engine:
    """How the training engine runs a planned configuration (:mod:`medfoundry.train.distributed`,
    :mod:`medfoundry.train.losses`): what decides the memory."""

    layout: str  # "single" (one process: nothing wrapped), "ddp" or "fsdp"
    precision: str  # "bf16" or "fp32"
    gpus: int

    @property
    def fsdp_bf16(self) -> bool:
        """FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``."""
        return self.layout == "fsdp" and self.precision == "bf16"

    @property
    def param_bytes(self) -> int:
        """Bytes per weight the forward pass reads (and per unsharded gradient): FSDP2's bf16 param_dtype,
        else the fp32 weights themselves (autocast casts them per use: :attr:`autocast_copies`)."""
        return 2 if self.fsdp_bf16 else 4

    @property
    def autocast_copies(self) -> bool:
        """bf16 autocast over fp32 weights (one process or DDP): every matmul casts its weight to bf16."""
        return self.precision == "bf16" and self.layout != "fsdp"

    @property
    def hidden_bytes(self) -> int:
        """Bytes per element of the residual stream, a block's input: bf16 when the weights are (FSDP2's
        policy); fp32 under autocast over fp32 weights (the embeddings' output and the residual additions
        stay fp32) and in fp32 runs."""
        return 2 if self.fsdp_bf16 else 4

    @property
    def policy(self) -> str:
        if self.fsdp_bf16:
            return "bf16: FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fp32 master weights"
        if self.precision == "bf16":
            reduce = "; gradients all-reduced in fp32" if self.layout == "ddp" else ""
            return f"bf16 autocast over fp32 weights (each matmul casts its weight){reduce}"
        comm = {"ddp": "; gradients all-reduced in fp32", "fsdp": "; weights gathered, gradients reduced in fp32"}
        return "fp32" + comm.get(self.layout, "")


@dataclass
class MemoryPlan:
    sharding: str  # the engine's layout: single (one process), ddp or fsdp
    precision: str
    mixed_precision: str
    bytes_per_parameter: dict
    states_gib: float
    ddp_buckets_gib: float
    micro_batch_size: int
    grad_accumulation: int
    activation_checkpointing: bool
    activations_gib: float
    activations_checkpointed_gib: float
    weight_copies_gib: float  # autocast's bf16 copies of fp32 weights (one process, DDP)
    fsdp_gathered_gib: float  # FSDP2: the unsharded weights of two blocks and of the root
    fsdp_reduce_gib: float  # FSDP2: a block's unsharded gradients and their fp32 reduce-scatter input
    loss_gib: float
    total_gib: float
    memory_gib: float
    fits: bool


@dataclass
class StoragePlan:
    """Checkpoints (``torch.distributed.checkpoint``), host memory per rank, and the exported model."""

    checkpoint_bytes_per_rank: int
    checkpoint_bytes_total: int
    checkpoints_kept: int  # checkpoint.keep_last
    async_save: bool
    host_init_bytes_per_rank: int
    host_save_bytes_per_rank: int
    export_dtype: str
    export_parameters: int
    export_bytes: int


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
    storage: StoragePlan
    flops_executed: float | None  # with activation checkpointing's recomputation
    hfu: float | None  # the hardware FLOPs utilization the MFU means (executed FLOPs / peak)
    days: float | None
    gpu_hours: float | None
    energy_kwh: float | None
    implied_mfu: float | None = None
    implied_mfu_6nd: float | None = None
    implied_hfu: float | None = None

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
    section = dict(recipe.plan or {})
    launched = launched_processes(getattr(recipe, "distributed", None))
    if launched is not None:
        section.setdefault("gpus", launched)
    plan = validate(PlanSection, section, f"{source}: plan")
    vocab = configs["tokenizer"].vocab_size if "tokenizer" in configs else None
    return Target(source, chosen, configs[chosen], plan, tokenizer_vocab=vocab, pretrain=configs.get("pretrain"))


def launched_processes(launch) -> int | None:
    """nnodes x nproc_per_node of a recipe's ``distributed:`` section (a dict or a config object): the
    processes ``medfoundry run`` starts its training stages on; None without one (or with a count torchrun
    resolves at launch, like ``gpu``)."""
    if launch is None:
        return None
    get = launch.get if isinstance(launch, dict) else lambda key, default=None: getattr(launch, key, default)
    nproc, nnodes = get("nproc_per_node", None), get("nnodes", 1)
    if not isinstance(nproc, int) or not isinstance(nnodes, int):
        return None
    return nproc * nnodes


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
    """The config of an HF checkpoint directory, a .gguf file or a Hub id (its config.json alone, fetched or read
    from the cache), or None when it is neither here (yet) nor on the Hub."""
    from transformers import AutoConfig

    from medfoundry.model import hub
    from medfoundry.model.load import is_gguf

    if hub.is_hub_id(init_from):  # or a local folder not downloaded yet (models/llama-7b-hf looks like an id)
        try:
            folder = hub.config_folder(init_from)
        except InputError:
            return None
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
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
        "directory (config.json) nor a .gguf file here, nor a model on the Hugging Face Hub (or in its cache when "
        "offline): download the base model first"
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


def _numel(params, trainable: bool = False) -> int:
    return sum(p.numel() for p in params if p.requires_grad or not trainable)


def _matmul_parameters(model, loss: str) -> list:
    """The weights and biases autocast casts for a matmul: those of the Linear and Conv1D layers the model's
    forward runs (the fused loss applies the output layer itself, casting it for that call only)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if loss == "chunked" else None
    seen, params = set(), []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head:
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def model_plan(target: Target, device: str) -> ModelPlan:
    from medfoundry.model.presets import flops_per_token
    from medfoundry.train.distributed import transformer_blocks

    model, source, attention, loss = build_meta_model(target, device)
    config = model.config
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    embedding = _embedding_parameters(model)
    context = context_of(target)
    blocks = transformer_blocks(model)  # the units fully_shard wraps, and that checkpointing recomputes
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    largest = max(blocks, key=lambda block: _numel(block.parameters()))
    matmul = _matmul_parameters(model, loss)
    in_largest = {id(p) for p in largest.parameters()}
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
        trainable_parameters=_numel(params, trainable=True),
        flops_per_token=flops_per_token(config, context),
        layer_parameters=_numel(largest.parameters()),
        layer_trainable_parameters=_numel(largest.parameters(), trainable=True),
        root_parameters=_numel(p for p in params if id(p) not in in_blocks),
        matmul_parameters=_numel(matmul),
        trainable_matmul_parameters=_numel(matmul, trainable=True),
        layer_matmul_parameters=_numel(p for p in matmul if id(p) in in_largest),
        # forward FLOPs of the blocks: 2 per block parameter and token, and the attention term's forward third
        recompute_flops_per_token=2.0 * _numel(p for p in params if id(p) in in_blocks)
        + 4.0 * config.num_hidden_layers * config.hidden_size * context,
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


def engine_for(sharding: str, gpus: int, precision: str) -> Engine:
    """The engine's layout: one process wraps nothing (:func:`medfoundry.train.distributed.wrap_model`)."""
    return Engine("single" if gpus == 1 else sharding, precision, gpus)


def state_bytes(parameters: int, trainable: int, sharding: str, gpus: int) -> float:
    """Weights, gradients and AdamW moments on one GPU (:data:`BYTES_PER_PARAMETER`; frozen weights have neither
    gradients nor moments): all of them under DDP (and in one process), 1/N of each under FSDP2."""
    b = BYTES_PER_PARAMETER
    states = parameters * b["weights"] + trainable * (b["gradients"] + b["adam"])
    return states / gpus if sharding == "fsdp" else float(states)


def ddp_bucket_bytes(m: ModelPlan, engine: Engine) -> float:
    """DDP's fp32 all-reduce buckets: a second copy of the gradients (:data:`DDP_BUCKET_BYTES`)."""
    return float(DDP_BUCKET_BYTES * m.trainable_parameters) if engine.layout == "ddp" else 0.0


def layer_activation_bytes(m: ModelPlan, micro_batch: int, precision: str = "bf16") -> float:
    """One layer's saved activations for backward (Korthikanti et al. 2022, eq. 2, no parallelism):
    ``34 s b h`` in 16 bits, plus ``5 a s^2 b`` for the attention scores, softmax and its dropout mask where
    the kernel stores them (eager attention; SDPA's flash / memory-efficient kernels recompute them); twice
    that in fp32 runs, whose activations are all 32-bit."""
    s, b, h, a = m.context, micro_batch, m.hidden_size, m.heads
    scores = 5 * a * s * s * b if m.attention == "eager" else 0
    return (34 * s * b * h + scores) * (2 if precision == "fp32" else 1)


def activation_bytes(m: ModelPlan, micro_batch: int, checkpointing: bool, engine: Engine) -> float:
    """Without checkpointing every layer keeps its activations. With it (transformers' activation
    checkpointing on every block) each block keeps only its input, ``s b h`` elements of the residual
    stream (:attr:`Engine.hidden_bytes`), and one block's activations exist at a time, while it is
    recomputed in backward."""
    layer = layer_activation_bytes(m, micro_batch, engine.precision)
    if not checkpointing:
        return m.layers * layer
    return m.layers * engine.hidden_bytes * m.context * micro_batch * m.hidden_size + layer


def weight_copy_bytes(m: ModelPlan, checkpointing: bool, engine: Engine) -> float:
    """bf16 autocast over fp32 weights (one process, DDP): each matmul casts its weight (and bias) to bf16,
    2 B per matmul parameter, and the copies stay until backward: autograd saves them, and autocast caches
    those of trainable weights until its context closes, after the loss. With activation checkpointing the
    saved ones are dropped but the cached ones stay to the end of the forward pass (all trainable matmul
    weights; one block's while it is recomputed). FSDP2's bf16 weights need no copies
    (:func:`fsdp_gathered_bytes`); fp32 runs none."""
    if not engine.autocast_copies:
        return 0.0
    if not checkpointing:
        return 2.0 * m.matmul_parameters
    return 2.0 * max(m.trainable_matmul_parameters, m.layer_matmul_parameters)


def fsdp_gathered_bytes(m: ModelPlan, engine: Engine) -> float:
    """FSDP2's unsharded weights, in its param_dtype (bf16 under the mixed-precision policy): the block being
    computed and the next one, prefetched (forward, and again in backward: blocks reshard after forward),
    and the root's (embeddings, final norm, an untied head), which stay gathered from its forward to the
    end of backward."""
    if engine.layout != "fsdp":
        return 0.0
    return float(engine.param_bytes * (min(2, m.layers) * m.layer_parameters + m.root_parameters))


def fsdp_reduce_bytes(m: ModelPlan, engine: Engine) -> float:
    """FSDP2's gradient reduce-scatter of a block: its unsharded gradients (in param_dtype) copied into an
    fp32 (reduce_dtype) input buffer, which lives while the next block's backward runs."""
    if engine.layout != "fsdp":
        return 0.0
    return float((engine.param_bytes + REDUCE_BYTES) * m.layer_trainable_parameters)


def loss_bytes(m: ModelPlan, micro_batch: int, engine: Engine) -> float:
    """The loss's tensors. ``plain``: about four fp32 [tokens x vocabulary] tensors (logits, their fp32 copy,
    log-probabilities, gradient). ``chunked`` (:func:`medfoundry.train.losses.linear_cross_entropy`): one
    logits buffer of at most a group of tokens in the compute dtype, an fp32 softmax chunk, the gradients it
    keeps for backward (the hidden states' in the compute dtype, the output weight's in fp32, and the
    product it is accumulated from), and under autocast over fp32 weights the bf16 casts of the hidden
    states and of the output weight."""
    from medfoundry.train.losses import GROUP_ELEMENTS, chunk_rows

    tokens, vocab, hidden = m.context * micro_batch, m.vocab_size, m.hidden_size
    if m.loss == "plain":
        return 16.0 * tokens * vocab
    compute = 2 if engine.precision == "bf16" else 4
    rows = chunk_rows(vocab)
    group = max(rows, GROUP_ELEMENTS // vocab // rows * rows)
    logits = compute * min(tokens, group) * vocab + 4 * min(tokens, rows) * vocab
    grads = compute * tokens * hidden + 4 * vocab * hidden
    products = (2 * vocab * hidden if compute == 2 else 0) + (4 * vocab * hidden if tokens > group else 0)
    casts = compute * tokens * hidden + 2 * vocab * hidden if engine.autocast_copies else 0
    return float(logits + grads + products + casts)


def memory_plan(m: ModelPlan, target: Target, hw: Accelerator, engine: Engine) -> MemoryPlan:
    cfg, plan = target.cfg, target.plan
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
    states = state_bytes(m.parameters, m.trainable_parameters, engine.layout, engine.gpus)
    buckets = ddp_bucket_bytes(m, engine)
    full, ckpt = activation_bytes(m, micro, False, engine), activation_bytes(m, micro, True, engine)
    copies, gathered = weight_copy_bytes(m, checkpointing, engine), fsdp_gathered_bytes(m, engine)
    reduce, loss = fsdp_reduce_bytes(m, engine), loss_bytes(m, micro, engine)
    total = states + buckets + (ckpt if checkpointing else full) + copies + gathered + reduce + loss
    return MemoryPlan(
        sharding=engine.layout,
        precision=engine.precision,
        mixed_precision=engine.policy,
        bytes_per_parameter=dict(BYTES_PER_PARAMETER),
        states_gib=states / GIB,
        ddp_buckets_gib=buckets / GIB,
        micro_batch_size=micro,
        grad_accumulation=accumulation,
        activation_checkpointing=checkpointing,
        activations_gib=full / GIB,
        activations_checkpointed_gib=ckpt / GIB,
        weight_copies_gib=copies / GIB,
        fsdp_gathered_gib=gathered / GIB,
        fsdp_reduce_gib=reduce / GIB,
        loss_gib=loss / GIB,
        total_gib=total / GIB,
        memory_gib=hw.memory_gib,
        fits=total <= USABLE_MEMORY * hw.memory_gib * GIB,
    )


def checkpoint_bytes(parameters: int, trainable: int) -> int:
    """The tensors of a training checkpoint: fp32 master weights (all, a tied one once) and AdamW's exp_avg
    and exp_avg_sq (trainable ones). Left out: AdamW's per-tensor ``step`` scalars, each rank's RNG file (a few
    KB), and process 0's trainer state, DCP's index, manifest and ``hf/`` folder (config and tokenizer)."""
    c = CHECKPOINT_BYTES_PER_PARAMETER
    return parameters * c["weights"] + trainable * c["adam"]


def storage_plan(m: ModelPlan, target: Target, engine: Engine) -> StoragePlan:
    """Checkpoints (``torch.distributed.checkpoint``), host memory per rank, and the exported model.

    Every rank writes its own shards. Under FSDP2 that is its 1/N of every tensor. Under DDP every rank holds
    the same (replicated) tensors and DCP's save planner deduplicates them, giving each to one rank and
    balancing the ranks' bytes: counted as 1/N per rank too (an assumption: the balance is by whole tensors).

    Host memory per rank: at model creation, FSDP2 builds the model on the meta device and materializes only
    the rank's shard (fp32), while one process or DDP builds the whole fp32 model on the CPU before moving it.
    While saving, nothing is gathered: ``dcp.save`` streams the rank's tensors to its files (at most its
    share of the checkpoint); with ``async_save`` the rank stages a host copy of its whole state first (its
    shard under FSDP2, the whole replicated state under DDP).

    The export: the final model (LoRA merged), in bf16 after a bf16 run (the seeds' releases), else fp32."""
    cfg, gpus = target.cfg, engine.gpus
    total = checkpoint_bytes(m.parameters, m.trainable_parameters)
    per_rank = round(total / gpus)
    async_save = cfg.checkpoint.async_save
    staged = per_rank if engine.layout != "ddp" else total
    lora = target.stage == "finetune" and getattr(cfg, "lora", None) is not None
    exported = m.parameters - m.trainable_parameters if lora else m.parameters
    export_dtype = "bf16" if engine.precision == "bf16" else "fp32"
    return StoragePlan(
        checkpoint_bytes_per_rank=per_rank,
        checkpoint_bytes_total=total,
        checkpoints_kept=cfg.checkpoint.keep_last,
        async_save=async_save,
        host_init_bytes_per_rank=round(
            BYTES_PER_PARAMETER["weights"] * m.parameters / (gpus if engine.layout == "fsdp" else 1)
        ),
        host_save_bytes_per_rank=staged if async_save else per_rank,
        export_dtype=export_dtype,
        export_parameters=exported,
        export_bytes=exported * (2 if export_dtype == "bf16" else 4),
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
    """The plan of ``target``; with ``days`` (a known wall-clock), also the MFU that duration implies.

    MFU is the training loop's ``mfu`` metric: model FLOPs (``flops_per_token``) over the peak. Activation
    checkpointing runs every block's forward again in backward, work the model FLOPs leave out: the plan
    also gives the FLOPs executed and the hardware utilization (HFU) the stated MFU then needs."""
    cfg, p = target.cfg, target.plan
    precision = training_precision(p.gpu, cfg.training.precision)
    hw = accelerator(p.gpu, precision)
    engine = engine_for(p.sharding or ("fsdp" if cfg.distributed.strategy == "fsdp" else "ddp"), p.gpus, precision)
    model = model_plan(target, "cpu" if p.gpu == CPU else "cuda")
    memory = memory_plan(model, target, hw, engine)
    tokens, note = token_count(target)
    flops = None if tokens is None else model.flops_per_token * tokens
    flops_6nd = None if tokens is None else 6.0 * model.parameters * tokens
    recompute = model.recompute_flops_per_token if memory.activation_checkpointing else 0.0
    executed = None if tokens is None else (model.flops_per_token + recompute) * tokens
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
        storage=storage_plan(model, target, engine),
        flops_executed=executed,
        hfu=None if executed is None else p.mfu * executed / flops,
        days=None if seconds is None else seconds / 86400,
        gpu_hours=gpu_hours,
        energy_kwh=None if gpu_hours is None or hw.tdp_watts is None else gpu_hours * hw.tdp_watts / 1e3,
    )
    if days is not None:
        if flops is None:
            raise ConfigError(f"--days: {note}")
        available = p.gpus * hw.peak_tflops * 1e12 * days * 86400
        plan.implied_mfu, plan.implied_mfu_6nd = flops / available, flops_6nd / available
        plan.implied_hfu = executed / available
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


def _size(n: float) -> str:
    """Bytes in GiB, or MiB / KiB below one GiB / MiB."""
    for shift, unit in ((30, "GiB"), (20, "MiB")):
        if n >= 1 << shift:
            return f"{_num(n / (1 << shift))} {unit}"
    return f"{_num(n / 1024)} KiB"


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
    layout = ONE_PROCESS if mem.sharding == "single" else SHARDING_NAMES[mem.sharding]
    divided = f"1/{plan.gpus} of them" if mem.sharding == "fsdp" else "all of them"
    total = sum(mem.bytes_per_parameter.values())
    states = f"{_gib(mem.states_gib)} weights + gradients + AdamW ({per_param} = {total} B/param{frozen}; {divided})"
    if mem.sharding == "ddp":
        states += f", {_gib(mem.ddp_buckets_gib)} DDP all-reduce buckets ({DDP_BUCKET_BYTES} B/param)"
    if mem.sharding == "fsdp":
        dtype = "bf16" if mem.precision == "bf16" else "fp32"
        weights = (
            f"{_gib(mem.fsdp_gathered_gib)} all-gathered {dtype} weights (2 blocks + root), "
            f"{_gib(mem.fsdp_reduce_gib)} gradient reduce-scatter (a block)"
        )
    elif mem.precision == "bf16":
        weights = f"{_gib(mem.weight_copies_gib)} bf16 weight copies (autocast's, kept until backward)"
    else:
        weights = "fp32: no weight copies"
    verdict = "fits" if mem.fits else f"DOES NOT FIT (over {USABLE_MEMORY:.0%} of memory)"
    return [
        [
            "sharding",
            f"{mem.sharding} ({layout}); micro-batch {mem.micro_batch_size} x "
            f"{mem.grad_accumulation} accumulation step(s) x {plan.gpus} GPUs",
        ],
        ["precision", mem.mixed_precision],
        ["memory/GPU", states],
        [
            "",
            f"{_gib(mem.activations_gib)} activations without checkpointing, {_gib(mem.activations_checkpointed_gib)} "
            f"with (using {'with' if mem.activation_checkpointing else 'without'})",
        ],
        ["", weights],
        ["", f"{_gib(mem.loss_gib)} loss buffers ({m.loss} loss)"],
        ["", f"{_gib(mem.total_gib)} of {mem.memory_gib:,.0f} GiB: {verdict}"],
    ]


def _storage_rows(plan: Plan) -> list[list[str]]:
    st, mem = plan.storage, plan.memory
    c = CHECKPOINT_BYTES_PER_PARAMETER
    frozen = ", frozen weights 4" if plan.model.trainable_parameters != plan.model.parameters else ""
    spread = ", the replicated tensors spread by DCP" if mem.sharding == "ddp" else ""
    created = "its fp32 shard, built on the meta device" if mem.sharding == "fsdp" else "the whole fp32 model"
    if not st.async_save:
        saving = "at most its shard, streamed: nothing gathered"
    else:
        saving = "async_save's staged copy of " + (
            "its whole, replicated state" if mem.sharding == "ddp" else "its shard"
        )
    return [
        [
            "checkpoint",
            f"{_size(st.checkpoint_bytes_per_rank)} per rank x {plan.gpus} = {_size(st.checkpoint_bytes_total)}; "
            f"keep_last {st.checkpoints_kept}: {_size(st.checkpoints_kept * st.checkpoint_bytes_total)} on disk",
        ],
        [
            "",
            f"fp32 weights {c['weights']} + AdamW {c['adam']} = {sum(c.values())} B/param{frozen}; "
            f"each rank writes its own shard{spread} (+ a few KB of RNG state)",
        ],
        ["host/rank", f"{_size(st.host_init_bytes_per_rank)} at model creation ({created})"],
        ["", f"{_size(st.host_save_bytes_per_rank)} while saving ({saving})"],
        [
            "export",
            f"{_size(st.export_bytes)} ({_count(st.export_parameters)} parameters in {st.export_dtype}, "
            f"{st.export_bytes // st.export_parameters} B/param)",
        ],
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
    if plan.flops_executed is not None and plan.flops_executed != plan.flops:
        rows.append(
            [
                "recomputation",
                f"{plan.flops_executed:.3g} executed: every block's forward again "
                f"(+{plan.model.recompute_flops_per_token:.3g} per token); HFU {plan.hfu:.1%} at {plan.mfu:.1%} MFU",
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
        hfu = f"; HFU {plan.implied_hfu:.1%}" if plan.implied_hfu != plan.implied_mfu else ""
        rows.append(["implied MFU", f"{plan.implied_mfu:.1%} (6·N·D alone: {plan.implied_mfu_6nd:.1%}){hfu}"])
    return rows


def table_rows(plan: Plan) -> list[list[str]]:
    """``[label, value]`` rows of the human-readable plan."""
    return _model_rows(plan) + _cost_rows(plan) + _memory_rows(plan) + _storage_rows(plan)
