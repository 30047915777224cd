"""A recipe: one YAML file describing a model from corpus to card, validated whole before any work.

::

    name: quickstart
    run_dir: runs/quickstart
    stages:
      corpus:    {...}   # medfoundry corpus build, minus output_dir
      tokenizer: {...}   # medfoundry tokenizer train, minus corpus_dir / output_dir
      tokens:    {...}   # medfoundry tokenize, minus corpus_dir / tokenizer_dir / output_dir
      pretrain:  {...}   # medfoundry pretrain, minus output_dir and data
      finetune:  {...}   # medfoundry finetune, minus output_dir (and model.init_from after a pretrain stage)
      eval:      {...}   # medfoundry eval, minus output_dir; `models` lists baselines besides the run's model
      generate:  {...}   # medfoundry generate, minus model and output: prompts answered by the run's model
    card: {...}          # medfoundry card: license, language, intended uses...
    distributed: {...}   # how pretrain and finetune start: processes per node, nodes, torchrun or slurm

Every stage is optional, but those present run in the order above, each writing ``run_dir/<stage>``;
``${run_dir}`` in any string of a stage section stands for the run directory.
The runner wires what one stage reads from another (a field given explicitly is kept): the tokenizer
trains on the corpus, the tokens use both, pretraining reads the tokens with the run's tokenizer (or,
continuing a model without a tokenizer stage, the model's own), fine-tuning starts from the pretrained
model, evaluation and generation use the last trained model (or, with neither, the eval's first
model). :func:`wire` returns each stage's typed config, exactly what its own command would take.

``distributed`` (:class:`~medfoundry.train.launch.LaunchConfig`) applies to the training stages only: the
runner starts them under torchrun on ``nproc_per_node`` processes (of ``nnodes`` nodes), or submits a Slurm
job for them; the other stages run in the runner's process. It is not part of any stage's key: the same
training on more processes is the same stage (a rerun with a different launch resumes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from medfoundry.card.config import CardConfig
from medfoundry.config import StrictModel, validate
from medfoundry.errors import ConfigError
from medfoundry.generation.config import GenerateConfig
from medfoundry.train.launch import LaunchConfig

STAGES = ("corpus", "tokenizer", "tokens", "pretrain", "finetune", "eval", "generate", "card")
TRAINED = ("finetune", "pretrain")  # the run's model comes from the last of these that the recipe has


class StagesConfig(StrictModel):
    """Each stage's section as written in the recipe (wired and validated by :func:`wire`)."""

    corpus: dict | None = None
    tokenizer: dict | None = None
    tokens: dict | None = None
    pretrain: dict | None = None
    finetune: dict | None = None
    eval: dict | None = None
    generate: dict | None = None


class RecipeConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str = Field(description="every stage writes run_dir/<stage>")
    description: str | None = None
    stages: StagesConfig
    card: CardConfig | None = Field(
        None, description="model card metadata (medfoundry card); a card is written when set"
    )
    distributed: LaunchConfig | None = Field(
        None, description="how the training stages (pretrain, finetune) start: torchrun or a Slurm job"
    )
    plan: dict | None = Field(None, description="the hardware the recipe targets (medfoundry plan)")

    @field_validator("stages")
    @classmethod
    def _some_stage(cls, stages: StagesConfig) -> StagesConfig:
        if not any(getattr(stages, s) is not None for s in StagesConfig.model_fields):
            raise ValueError(f"a recipe needs at least one stage of {', '.join(STAGES[:-1])}")
        return stages

    @field_validator("distributed")
    @classmethod
    def _something_to_launch(cls, launch: LaunchConfig | None, info: ValidationInfo) -> LaunchConfig | None:
        stages = info.data.get("stages")
        if launch is not None and stages is not None and not any(getattr(stages, s) is not None for s in TRAINED):
            raise ValueError(
                "the recipe has no training stage (pretrain, finetune) to launch; the other stages run in "
                "medfoundry run's process. Remove the section"
            )
        return launch

    def present(self) -> list[str]:
        """The recipe's stages, in run order."""
        return [s for s in STAGES if (self.card is not None if s == "card" else getattr(self.stages, s) is not None)]


def _fill(section: dict, path: str, value: Any) -> None:
    """Set the dotted ``path`` in ``section`` unless the recipe gave it."""
    *parents, last = path.split(".")
    node = section
    for key in parents:
        node = node.setdefault(key, {})
    node.setdefault(last, value)


def _refuse(section: dict, path: str, stage: str, why: str) -> None:
    node: Any = section
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    raise ConfigError(f"stages.{stage}.{path}: set by the runner ({why}); remove it from the recipe")


def final_model(recipe: RecipeConfig) -> str | None:
    """The run's model: the last trained one, else the first model the eval stage names."""
    run = Path(recipe.run_dir)
    for stage in TRAINED:
        if getattr(recipe.stages, stage) is not None:
            return str(run / stage / "model")
    models = (recipe.stages.eval or {}).get("models") or []
    return str(models[0]) if models else None


def wire(recipe: RecipeConfig) -> dict[str, StrictModel]:
    """Each present stage's typed config, with the runner's paths filled in."""
    from medfoundry.corpus.config import CorpusConfig
    from medfoundry.eval.config import EvalConfig
    from medfoundry.sft.config import FinetuneConfig
    from medfoundry.tokenizer.config import TokenizeConfig, TokenizerTrainConfig
    from medfoundry.train.config import PretrainConfig

    run, s = Path(recipe.run_dir), _expand(recipe.stages, recipe.run_dir)
    out = {name: str(run / name) for name in STAGES}
    tokenizer_dir = out["tokenizer"] if s.tokenizer is not None else None
    if tokenizer_dir is None and s.pretrain is not None:
        tokenizer_dir = (s.pretrain.get("data") or {}).get("tokenizer_dir") or (s.pretrain.get("model") or {}).get(
            "init_from"
        )
    sections: dict[str, tuple[type, dict]] = {}
    if s.corpus is not None:
        sections["corpus"] = CorpusConfig, _section(s.corpus, "corpus", {"output_dir": out["corpus"]})
    if s.tokenizer is not None:
        sections["tokenizer"] = (
            TokenizerTrainConfig,
            _section(
                s.tokenizer,
                "tokenizer",
                {"output_dir": out["tokenizer"], "corpus_dir": out["corpus"] if s.corpus is not None else None},
            ),
        )
    if s.tokens is not None:
        sections["tokens"] = (
            TokenizeConfig,
            _section(
                s.tokens,
                "tokens",
                {
                    "output_dir": out["tokens"],
                    "corpus_dir": out["corpus"] if s.corpus is not None else None,
                    "tokenizer_dir": tokenizer_dir,
                },
            ),
        )
    if s.pretrain is not None:
        sections["pretrain"] = (
            PretrainConfig,
            _section(
                s.pretrain,
                "pretrain",
                {
                    "output_dir": out["pretrain"],
                    "data.tokens_dir": out["tokens"] if s.tokens is not None else None,
                    "data.tokenizer_dir": tokenizer_dir,
                },
            ),
        )
    if s.finetune is not None:
        sections["finetune"] = (
            FinetuneConfig,
            _section(
                s.finetune,
                "finetune",
                {
                    "output_dir": out["finetune"],
                    "model.init_from": str(run / "pretrain" / "model") if s.pretrain is not None else None,
                },
            ),
        )
    if s.eval is not None:
        sections["eval"] = EvalConfig, _eval_section(s.eval, recipe, out["eval"])
    if s.generate is not None:
        sections["generate"] = GenerateConfig, _generate_section(s.generate, recipe, out["generate"])
    return {name: validate(model, tree, f"{recipe.name}: stages.{name}") for name, (model, tree) in sections.items()}


def _expand(stages: StagesConfig, run_dir: str) -> StagesConfig:
    """The stage sections with ``${run_dir}`` in any string replaced by the run directory."""

    def sub(value):
        if isinstance(value, str):
            return value.replace("${run_dir}", run_dir)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return StagesConfig(**sub(stages.model_dump()))


def _section(given: dict, stage: str, wired: dict[str, str | None]) -> dict:
    """A copy of the stage's section with the runner's paths; a wired path the recipe also sets is an error
    for output directories (the run directory owns them), the recipe's choice otherwise."""
    import copy

    section = copy.deepcopy(given)
    for path, value in wired.items():
        if path == "output_dir":
            _refuse(section, path, stage, f"every stage writes {value}")
        if value is not None:
            _fill(section, path, value)
    return section


def _eval_section(given: dict, recipe: RecipeConfig, output_dir: str) -> dict:
    section = _section(given, "eval", {"output_dir": output_dir})
    model = final_model(recipe)
    trained = any(getattr(recipe.stages, s) is not None for s in TRAINED)
    baselines = list(section.get("models") or [])
    section["models"] = [model, *baselines] if trained else baselines
    if not section["models"]:
        raise ConfigError(
            f"{recipe.name}: stages.eval.models: the recipe trains no model, so eval needs the models to evaluate"
        )
    return section


def _generate_section(given: dict, recipe: RecipeConfig, output_dir: str) -> dict:
    output = str(Path(output_dir) / "samples.jsonl")
    _refuse(given, "output", "generate", f"the stage writes {output}")
    _refuse(given, "model", "generate", "the run's model, the last trained one or the eval's first")
    section = _section(given, "generate", {"output": output})
    model = final_model(recipe)
    if model is None:
        raise ConfigError(
            f"{recipe.name}: stages.generate: the recipe has no model to generate with (no pretrain, finetune or "
            "eval models)"
        )
    section["model"] = model
    return section
