"""Typed configuration of ``medfoundry pretrain``: one file from a laptop CPU to a GPU cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medfoundry.config import StrictModel
from medfoundry.train.optim import OptimConfig
from medfoundry.train.schedules import ScheduleConfig


class ModelConfig(StrictModel):
    preset: str = Field(
        description="a preset name (gpt2-tiny, gpt2-52m, biomedlm, llama-tiny, smollm2-135m, bloom-560m, ...) "
        "or a path to a Hugging Face config.json / model directory"
    )
    init_from: str | None = Field(
        None,
        description="continue pretraining from an HF checkpoint directory, a Hub id (org/name[@revision]) or a "
        ".gguf file",
    )
    allow_pickle: bool = Field(
        False,
        description="allow pickled weights (pytorch_model.bin) in init_from, loaded with "
        "torch.load(weights_only=True); default: safetensors only",
    )
    context: int = Field(256, gt=1, description="training sequence length")
    overrides: dict = Field(default_factory=dict, description="config fields to change, e.g. {n_layer: 4}")


class DataConfig(StrictModel):
    tokens_dir: str = Field(description="output of `medfoundry tokenize`: train/ and val/ shards")
    tokenizer_dir: str = Field(description="the tokenizer the shards were made with (exported with the model)")
    verify_shards: bool = Field(
        True,
        description="check every shard against the checksums of its index.json when "
        "training starts or resumes (reads all tokens once: a few seconds per GB); a "
        "corrupted shard is named before any step",
    )


class TrainingConfig(StrictModel):
    seed: int = 0
    steps: int = Field(gt=0, description="optimizer steps")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward pass on each process")
    global_batch_size: int = Field(8, gt=0, description="sequences per optimizer step, all processes together")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast where the hardware has it"
    )
    activation_checkpointing: bool = False
    compile: Literal["auto", "blocks", "model", "off"] = Field(
        "auto",
        description="torch.compile: blocks = each transformer block compiled in place (the model stays a plain "
        "transformers model: same state dict, checkpoints and export), model = the whole wrapped model, "
        "off = eager; auto = blocks where it pays and works (medfoundry.train.accel.compile_for)",
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description="attention kernel: auto = eager on CPU below context 512, sdpa otherwise "
        "(medfoundry.train.accel.attention_for)",
    )
    loss: Literal["auto", "chunked", "plain"] = Field(
        "auto",
        description="chunked = output layer fused with the fp32 cross-entropy, by chunks of tokens, "
        "never the full fp32 logits (medfoundry.train.losses); auto = chunked where the "
        "model allows it (GPT-2, LLaMA, BLOOM), plain otherwise",
    )
    max_consecutive_skips: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")


class CheckpointConfig(StrictModel):
    every: int = Field(100, gt=0, description="steps between checkpoints")
    keep_last: int = Field(2, ge=1)
    async_save: bool = Field(
        False,
        description="write the shards in the background (torch.distributed.checkpoint.async_save) while "
        "training goes on; costs a host copy of this process's shard of the state while it is written",
    )


class EvalConfig(StrictModel):
    every: int = Field(100, gt=0, description="steps between validations (and one at the end)")
    batches: int = Field(16, gt=0, description="validation micro-batches, the same windows every time")


class WandbConfig(StrictModel):
    """A Weights & Biases run beside metrics.jsonl: the same scalars at the same steps, the config, the summary."""

    project: str = Field(description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user (default: your default entity)")
    name: str | None = Field(None, description="the run's display name (default: one W&B makes up)")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="default: $WANDB_MODE, else online; offline runs are uploaded later with `wandb sync`"
    )


class LogConfig(StrictModel):
    every: int = Field(10, gt=0)
    tensorboard: bool = Field(
        False,
        description="also write the metrics as TensorBoard scalars into "
        "<output_dir>/tensorboard/ (needs the tensorboard package)",
    )
    wandb: WandbConfig | None = Field(
        None,
        description="also log to Weights & Biases (needs the wandb package); its files go to <output_dir>/wandb/ "
        "(or $WANDB_DIR), and a resumed run continues the same W&B run",
    )


class DistributedConfig(StrictModel):
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="under torchrun; auto = ddp")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on GPU, gloo on CPU")


class ExportConfig(StrictModel):
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="dtype of the exported model/ (and of `medfoundry export` by default): auto = bf16 for "
        "bf16 training, as the seeds' releases are, fp32 for fp32 training",
    )

    def torch_name(self, precision: str) -> str:
        """The transformers dtype name of the export of a run trained in ``precision``."""
        choice = ("bf16" if precision == "bf16" else "fp32") if self.dtype == "auto" else self.dtype
        return {"bf16": "bfloat16", "fp32": "float32"}[choice]


class RunConfig(StrictModel):
    """The sections every training run has (``medfoundry pretrain`` and ``medfoundry finetune``)."""

    output_dir: str
    training: TrainingConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _batch_divides(self) -> RunConfig:
        t = self.training
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(
                f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"training.micro_batch_size ({t.micro_batch_size})"
            )
        return self

    def grad_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process."""
        t = self.training
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            from medfoundry.errors import ConfigError

            raise ConfigError(
                f"training.global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size "
                f"x processes ({t.micro_batch_size} x {world_size} = {per_step}); change one of them"
            )
        return t.global_batch_size // per_step


class PretrainConfig(RunConfig):
    model: ModelConfig
    data: DataConfig
