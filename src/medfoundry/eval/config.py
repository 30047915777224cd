"""Typed configuration of ``medfoundry eval``: which models, which tasks, how they are prompted and scored."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medfoundry.config import BENCHMARKS_ENV, StrictModel, benchmarks_from_env
from medfoundry.generation.config import SamplingConfig

NO_BENCHMARKS = (
    f"set benchmarks_dir in the eval config (or --set benchmarks_dir=DIR) or the {BENCHMARKS_ENV} environment "
    "variable to the folder of the benchmark files (laid out like ../shared/data/benchmarks)"
)


def default_benchmarks_dir() -> Path | None:
    """A developer's last resort: ``../shared/data/benchmarks`` beside the source checkout this package runs from
    (``src/medfoundry`` next to a ``pyproject.toml``), when that folder exists. An installed package has none."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parents[1]
    if package.parent.name != "src" or not (checkout / "pyproject.toml").is_file():
        return None
    folder = checkout.parent / "shared" / "data" / "benchmarks"
    return folder if folder.is_dir() else None


class ChainOfThoughtConfig(SamplingConfig):
    """Chain-of-thought generation (the engine's sampling fields; ``stop`` defaults to each task's, ``seed`` to the
    run's ``seed``); ``samples > 1`` is self-consistency (majority vote)."""

    samples: int = Field(1, ge=1, description="completions per question; the answer is their majority vote")

    @model_validator(mode="after")
    def _sampling_for_votes(self) -> ChainOfThoughtConfig:
        if self.samples > 1 and self.greedy:
            raise ValueError("samples > 1 (self-consistency) needs temperature > 0: greedy samples are all the same")
        return self


class EvalConfig(StrictModel):
    output_dir: str
    models: list[str] = Field(
        min_length=1,
        description="Hugging Face model directories, Hub ids (org/name[@revision]) or .gguf files, compared side "
        "by side",
    )
    tasks: list[str | dict] = Field(
        default_factory=list, description="task or group names, or inline task definitions (these or lm_eval_tasks)"
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness task or group names, run by lm-eval itself on medfoundry's scorer "
        "(results in OUTPUT/<model>/lm_eval/)",
    )
    lm_eval_include: list[str] = Field(
        default_factory=list, description="folders of lm-eval task YAML files (lm-eval's --include_path)"
    )
    lm_eval_log_samples: bool = Field(False, description="also write lm-eval's per-sample records")
    benchmarks_dir: str | None = Field(
        None,
        description=f"where task data files are; default ${BENCHMARKS_ENV} (or, in a source checkout, "
        "../shared/data/benchmarks beside it)",
    )
    task_dirs: list[str] = Field(default_factory=list, description="folders of your own task YAML files")
    prompt_style: str = Field(
        "lm_eval",
        description="lm_eval (lm-eval's prompts, byte for byte), meditron, or instruct "
        "(the fine-tuning format of medfoundry.sft, through the model's chat template)",
    )
    mode: Literal["loglik", "cot"] | None = Field(None, description="override every task's mode")
    num_fewshot: int = Field(0, ge=0)
    fewshot_seed: int = Field(
        1234,
        description="seeds the demonstrations: with a task's lm_eval sampler (the default) it is lm-eval's "
        "--fewshot_seed (1234 is lm-eval's default) and the draws are lm-eval's; with per_question or fixed, "
        "medfoundry's own draws",
    )
    fewshot_sampler: Literal["lm_eval", "per_question", "first_n", "fixed"] | None = Field(
        None,
        description="replaces every task's fewshot.sampler (and a lender's, with fewshot_source); default: each "
        "task's own (lm_eval for the built-in tasks, first_n for MMLU)",
    )
    fewshot_source: str | None = Field(
        None,
        description="TASK[:SPLIT] giving demonstrations to tasks that have no few-shot split here (MedQA, MedMCQA)",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="chain-of-thought prompts go through the tokenizer's chat template when it has one"
    )
    generation: ChainOfThoughtConfig = Field(default_factory=ChainOfThoughtConfig)
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="compile the chain-of-thought decode step: auto = on a GPU, and on a CPU when the generation "
        "is long enough to earn the compile (about a minute)",
    )
    limit: int | None = Field(None, gt=0, description="only the first N questions (documents) of each task")
    batch_size: int | None = Field(None, gt=0, description="default: automatic; never changes the results")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 where the hardware computes it")
    device: str = "auto"
    threads: int = Field(0, ge=0, description="0 = the runtime's choice")
    bootstrap_iters: int = Field(1000, ge=0, description="0 = no bootstrap standard errors")
    seed: int = Field(0, description="bootstrap resampling and generation sampling")
    allow_pickle: bool = Field(
        False,
        description="allow pickled weights (pytorch_model.bin) in the models, loaded with "
        "torch.load(weights_only=True); default: safetensors only",
    )

    @model_validator(mode="after")
    def _some_tasks(self) -> EvalConfig:
        if not self.tasks and not self.lm_eval_tasks:
            raise ValueError("no tasks: name some in tasks (medfoundry's) or lm_eval_tasks (lm-evaluation-harness's)")
        return self

    def benchmarks_path(self) -> Path | None:
        """The benchmarks folder: ``benchmarks_dir``, else ``$MEDFOUNDRY_BENCHMARKS``, else a source checkout's
        ``../shared/data/benchmarks``; None when there is none (tasks then need absolute paths or their hub
        loaders, and a missing file's error says how to set it: :data:`NO_BENCHMARKS`)."""
        given = self.benchmarks_dir or benchmarks_from_env()
        return Path(given).expanduser() if given else default_benchmarks_dir()
