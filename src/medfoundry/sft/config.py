"""Typed configuration of fine-tuning: the data (sources, template, lengths, packing, mixture, splits, overlap
guard) and the run (``medfoundry finetune``: the model, LoRA, and the training sections of pretraining)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medfoundry.config import BENCHMARKS_ENV, StrictModel, benchmarks_dir_from_env
from medfoundry.train.config import EvalConfig, RunConfig, TrainingConfig
from medfoundry.train.optim import OptimConfig


class SFTSourceConfig(StrictModel):
    """One instruction source: a file in a chat format, or a benchmark's training data through a converter."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(
        description="a JSON/JSONL(.gz) or Parquet file, or a folder written by datasets' save_to_disk (a glob "
        "matches several); for converters the benchmark file (mmlu: a CSV or a folder of CSVs)"
    )
    format: Literal["auto", "alpaca", "messages", "sharegpt"] = Field(
        "auto", description="file sources: auto = from the keys of the first record"
    )
    split: str | None = Field(None, description="a save_to_disk DatasetDict folder: the split to read")
    converter: Literal["pubmedqa", "medmcqa", "medqa", "mmlu"] | None = None
    reasoning: bool = Field(
        False, description="pubmedqa/medmcqa: LONG_ANSWER / exp as chain of thought before the answer"
    )
    cop_base: Literal[0, 1] | None = Field(
        None, description="medmcqa: whether cop counts from 0 or 1; default: detected"
    )
    test_ids: str | None = Field(None, description="pubmedqa: test_ground_truth.json; default: beside path")
    weight: float | None = Field(None, gt=0, le=1, description="share of the train mixture; unset = every example once")
    max_examples: int | None = Field(None, gt=0, description="use at most this many train examples (a seeded subset)")
    val_fraction: float | None = Field(None, ge=0, lt=1, description="default: validation.fraction")

    @model_validator(mode="after")
    def _options_fit(self) -> SFTSourceConfig:
        changed = {name for name, f in type(self).model_fields.items() if getattr(self, name) != f.default}
        for option in ("format", "split"):
            if self.converter and option in changed:
                raise ValueError(
                    f"{option} applies to file sources; a converter source reads its benchmark's own format"
                )
        takes = {"reasoning": ("pubmedqa", "medmcqa"), "cop_base": ("medmcqa",), "test_ids": ("pubmedqa",)}
        for option, converters in takes.items():
            if option in changed and self.converter not in converters:
                raise ValueError(
                    f"{option!r} applies to the {' and '.join(converters)} converter(s), not to this source"
                )
        return self


class TemplateConfig(StrictModel):
    name: Literal["chatml", "biomed_llama", "model"] = Field(
        "chatml",
        description="chatml: <|im_start|>/<|im_end|> added as tokens (Meditron); biomed_llama: ### Question / "
        "### Options / ### Answer; model: the tokenizer's own chat template",
    )
    system_prompt: str | None = Field(None, description="system message for conversations that have none")
    train_on: Literal["all_assistant", "last"] = Field(
        "all_assistant", description="which assistant turns carry loss; prompts never do"
    )


class MixtureConfig(StrictModel):
    by: Literal["examples", "response_tokens"] = Field("examples", description="what the source weights are shares of")
    total: int | None = Field(
        None,
        gt=0,
        description="size of one mixture epoch in `by` units; default: the largest that repeats no weighted source",
    )
    max_repeat: float = Field(10.0, ge=1, description="a source repeated more than this many times is an error")


class ValidationConfig(StrictModel):
    fraction: float = Field(0.05, ge=0, lt=1, description="share of each source held out, by a hash of the record")
    seed: int = 0


class OverlapConfig(StrictModel):
    benchmarks_dir: str | None = Field(
        None,
        description="evaluation sets laid out like ../shared/data/benchmarks; default "
        f"${BENCHMARKS_ENV} unless allow_test_overlap",
    )
    sets: list[Literal["pubmedqa", "medqa", "medmcqa", "mmlu"]] = Field(
        default_factory=lambda: ["pubmedqa", "medqa", "medmcqa", "mmlu"]
    )
    ngram: int = Field(13, ge=4)
    min_fraction: float = Field(
        0.5, gt=0, le=1, description="a record covering this share of a test item's n-grams overlaps it"
    )


class SFTDataConfig(StrictModel):
    tokenizer: str = Field(
        description="the base model's tokenizer: an HF tokenizer or model directory, "
        "a GPT-2 style vocab.json + merges.txt directory, or a .gguf file"
    )
    sources: list[SFTSourceConfig] = Field(min_length=1)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    max_length: int = Field(1024, gt=8, description="tokens per training sequence")
    packing: bool = Field(True, description="several examples per sequence, without attention across them")
    truncation: Literal["error", "left_prompt", "drop"] = Field(
        "error",
        description="an example longer than max_length: error, cut its prompt from the left (never the "
        "response: if that alone is too long the example is dropped and counted), or drop it",
    )
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    overlap: OverlapConfig = Field(default_factory=OverlapConfig)
    allow_test_overlap: bool = Field(False, description="train on records that overlap evaluation test items")
    drop_test_overlap: bool = Field(
        False, description="leave records that overlap evaluation test items out, and report them"
    )
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _benchmarks_from_env(cls, data):
        """``$MEDFOUNDRY_BENCHMARKS`` stands in for ``overlap.benchmarks_dir`` where the check is required (not with
        ``allow_test_overlap``), so that the config, and its recipe stage's key, change only where it is read."""
        if not isinstance(data, dict) or data.get("allow_test_overlap"):
            return data
        overlap = data.get("overlap") or {}
        return {**data, "overlap": benchmarks_dir_from_env(overlap)} if isinstance(overlap, dict) else data

    @model_validator(mode="after")
    def _check(self) -> SFTDataConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        if self.allow_test_overlap and self.drop_test_overlap:
            raise ValueError(
                "allow_test_overlap and drop_test_overlap exclude each other: keep the records or drop them"
            )
        if not self.allow_test_overlap and not self.overlap.benchmarks_dir:
            raise ValueError(
                f"overlap.benchmarks_dir is required (or the {BENCHMARKS_ENV} environment variable) to check the "
                "training data against the evaluation test splits (e.g. ../shared/data/benchmarks); or set "
                "allow_test_overlap: true"
            )
        weights = [s.weight for s in self.sources if s.weight is not None]
        if len(weights) == len(self.sources) and abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"when every source has a weight they must sum to 1; got {sum(weights):.6f}")
        if len(weights) < len(self.sources) and sum(weights) >= 1:
            raise ValueError(
                f"weights must sum below 1 when some sources have none (those are taken whole); got {sum(weights):.3f}"
            )
        if len(weights) < len(self.sources) and self.mixture.total:
            raise ValueError("mixture.total needs every source to have a weight (unweighted sources fix the size)")
        return self


# ---------------------------------------------------------------------------------------------- the run


class FinetuneModelConfig(StrictModel):
    init_from: str = Field(
        description="the model to fine-tune: a Hugging Face checkpoint directory, a Hub id (org/name[@revision]) "
        "or a .gguf file"
    )
    allow_pickle: bool = Field(
        False,
        description="allow pickled weights (pytorch_model.bin) in init_from, loaded with "
        "torch.load(weights_only=True); default: safetensors only",
    )


class FinetuneDataConfig(SFTDataConfig):
    tokenizer: str | None = Field(None, description="the base tokenizer; default: model.init_from's")
    prepared_dir: str | None = Field(
        None,
        description="where the prepared data are written (reused when "
        "config and inputs match); default <output_dir>/data",
    )


class FinetuneTrainingConfig(TrainingConfig):
    steps: int | None = Field(None, gt=0, description="optimizer steps; or set epochs")
    epochs: float | None = Field(
        None,
        gt=0,
        description="passes over the prepared train sequences, rounded up to whole optimizer steps; or set steps",
    )
    micro_batch_size: int = Field(4, gt=0, description="sequences per forward pass on each process")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FinetuneTrainingConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.steps and training.epochs")
        return self


class LoraConfig(StrictModel):
    """Low-rank adapters (peft) instead of updating every weight."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        "all-linear", description="peft's target_modules: all-linear (every linear layer but the output layer) or names"
    )
    merge: bool = Field(
        True,
        description="export the merged weights as a plain Hugging Face checkpoint in "
        "model/ (the adapter alone is always saved in adapter/)",
    )


class FinetuneConfig(RunConfig):
    model: FinetuneModelConfig
    data: FinetuneDataConfig
    training: FinetuneTrainingConfig
    lora: LoraConfig | None = Field(None, description="set to train LoRA adapters instead of every weight")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-5, weight_decay=0.0))
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(every=50, batches=32))

    def data_config(self) -> SFTDataConfig:
        """The data section as :func:`medfoundry.sft.dataset.prepare` takes it (tokenizer defaulted to the model's)."""
        fields = self.data.model_dump(exclude={"prepared_dir"})
        return SFTDataConfig(**{**fields, "tokenizer": self.data.tokenizer or self.model.init_from})

    def prepared_path(self) -> Path:
        return Path(self.data.prepared_dir or Path(self.output_dir) / "data")
