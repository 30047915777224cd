"""A run directory's artifacts, read strictly: a missing or corrupt file is an :class:`InputError` naming it.

Each stage's output is known by its typed ``manifest.json`` (:class:`~medfoundry.manifest.Manifest`). A stage
that did not run has no folder and is ``None`` here; a folder without the files its stage writes when it
finishes is an error, since a card must not describe a half-written model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from medfoundry.card.config import CardConfig
from medfoundry.errors import InputError
from medfoundry.io import iter_json_lines
from medfoundry.manifest import MANIFEST, Manifest, read_json

TRAINING_STAGES = ("pretrain", "finetune")
STAGE_DIRS = ("corpus", "tokenizer", "tokens", "pretrain", "finetune", "eval", "generate")  # in a run directory


def require(data: dict, path: Path, *keys: str) -> None:
    """Fail with the file's name when an artifact lacks a field the card reads."""
    for key in keys:
        if key not in data:
            raise InputError(str(path), f"no {key!r} field: not an artifact this version of medfoundry wrote")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(str(path), "not found")
    return [record for _, record in iter_json_lines(path)]


@dataclass
class ModelInfo:
    """A Hugging Face model directory: its config and what its safetensors headers say."""

    path: Path
    config: dict
    parameters: int
    weight_dtypes: list[str]
    chat_template: bool

    def field(self, *names: str):
        """The first of ``names`` the config has (GPT-2, LLaMA and BLOOM name the same things differently)."""
        return next((self.config[n] for n in names if self.config.get(n) is not None), None)


def load_model(path: Path) -> ModelInfo:
    config = read_json(path / "config.json", "not found: not a Hugging Face model directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(str(path), "no .safetensors weights")
    parameters, dtypes = 0, set()
    for file in files:
        tensors = _safetensors_header(file)
        parameters += sum(math.prod(t["shape"]) for t in tensors.values())
        dtypes |= {t["dtype"] for t in tensors.values()}
    return ModelInfo(path, config, parameters, sorted(dtypes), _has_chat_template(path))


def _safetensors_header(path: Path) -> dict:
    """The tensor entries of a safetensors file's JSON header (shapes and dtypes, without reading weights)."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        return {name: entry for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, OSError, AttributeError) as exc:
        raise InputError(str(path), f"not a readable safetensors file ({exc})") from None


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    config = path / "tokenizer_config.json"
    return config.is_file() and bool(read_json(config).get("chat_template"))


@dataclass
class Training:
    """A pretrain or finetune stage's output directory."""

    stage: str
    dir: Path
    manifest: Manifest
    run: dict  # run.json: config, world_size, device, precision, kernels...
    summary: dict  # summary.json
    metrics: list[dict]  # metrics.jsonl
    model: ModelInfo
    data: Manifest | None  # fine-tuning: the prepared data's manifest
    data_dir: Path | None  # and its folder

    @property
    def config(self) -> dict:
        return self.run["config"]

    @property
    def hours(self) -> float:
        """Wall-clock hours from the first to the last metrics record (a pause before a resume included)."""
        times = [r["time"] for r in self.metrics if isinstance(r.get("time"), (int, float))]
        return (max(times) - min(times)) / 3600 if times else 0.0


def load_training(stage: str, directory: Path) -> Training:
    run = read_json(directory / "run.json", f"not found: the {stage} stage did not start")
    require(run, directory / "run.json", "config", "world_size", "device", "precision")
    manifest = Manifest.read(directory, stage)
    summary = read_json(
        directory / "summary.json", f"not found: the {stage} stage has not finished (run it again to resume it)"
    )
    model_dir = directory / "model"
    if not model_dir.is_dir():
        raise InputError(
            str(model_dir),
            "not found: the run exported no full model (a LoRA run with lora.merge: false "
            "saves only adapter/); the card describes a full model",
        )
    data_dir = _sft_data_dir(directory, run) if stage == "finetune" else None
    data = Manifest.read(data_dir, "sft_data") if data_dir is not None else None
    metrics = read_jsonl(directory / "metrics.jsonl")
    return Training(stage, directory, manifest, run, summary, metrics, load_model(model_dir), data, data_dir)


def _sft_data_dir(directory: Path, run: dict) -> Path:
    """The prepared fine-tuning data: ``data/`` beside the run, else where run.json says it is."""
    recorded = Path((run.get("data") or {}).get("dir") or directory / "data")
    local = directory / "data"
    return local if (local / MANIFEST).is_file() or not (recorded / MANIFEST).is_file() else recorded


@dataclass
class Evaluation:
    dir: Path
    manifest: Manifest
    results: dict[str, dict]  # model name -> its results.json
    model: str | None  # the run's model among them; None when the eval did not evaluate it

    @property
    def models(self) -> dict[str, dict]:
        """Model name -> {path, model_files_hash}."""
        return self.manifest.details["models"]


def load_evaluation(directory: Path, final: Training | None) -> Evaluation:
    manifest = Manifest.read(directory, "eval")
    require(manifest.details, directory / MANIFEST, "models")
    results = {}
    for name in manifest.details["models"]:
        path = directory / name / "results.json"
        results[name] = read_json(path)
        require(results[name], path, "results", "configs", "n-shot", "n-samples", "config")
    return Evaluation(directory, manifest, results, _run_model(manifest, final))


def _run_model(manifest: Manifest, final: Training | None) -> str | None:
    """The name under which the eval stage scored the run's model: the one at ``<stage>/model`` of the last
    training stage (compared by the path's tail, so the card can be written from another working directory;
    among several such, the one at the same absolute path), or, for a run that trained nothing, the first
    model evaluated."""
    models = manifest.details["models"]
    if final is None:
        return next(iter(models), None)
    tail = [name for name, m in models.items() if Path(m["path"]).parts[-2:] == (final.stage, "model")]
    same = [name for name in tail if Path(models[name]["path"]).resolve() == final.model.path.resolve()]
    return next(iter(same or tail), None)


@dataclass
class Run:
    """Everything a card is made from. Stages that did not run are ``None``."""

    dir: Path
    card: CardConfig
    recipe: dict
    corpus: Manifest | None = None
    tokenizer: Manifest | None = None
    fertility: dict | None = None
    tokens: Manifest | None = None
    pretrain: Training | None = None
    finetune: Training | None = None
    eval: Evaluation | None = None
    samples: list[dict] | None = None

    @property
    def final(self) -> Training | None:
        """The training stage whose model the card describes: the last one that ran."""
        return self.finetune or self.pretrain

    @property
    def trainings(self) -> list[Training]:
        return [t for t in (self.pretrain, self.finetune) if t is not None]

    @cached_property
    def model(self) -> ModelInfo | None:
        """The model the card describes: the trained one, else the first one evaluated (when it is a model
        directory)."""
        if self.final is not None:
            return self.final.model
        if self.eval is None or self.eval.model is None:
            return None
        path = Path(self.eval.models[self.eval.model]["path"])
        return load_model(path) if (path / "config.json").is_file() else None

    @property
    def model_path(self) -> str | None:
        if self.final is not None:
            return str(self.final.model.path)
        if self.eval is not None and self.eval.model is not None:
            return self.eval.models[self.eval.model]["path"]
        return None

    def relative(self, path: Path) -> str:
        """``path`` as the card names it: relative to the run directory."""
        return Path(os.path.relpath(path, self.dir)).as_posix()

    @property
    def name(self) -> str:
        return self.card.model_name or self.recipe.get("name") or self.dir.resolve().name

    def model_results(self) -> dict | None:
        """results.json of the run's model, or None when it was not evaluated."""
        if self.eval is None or self.eval.model is None:
            return None
        return self.eval.results[self.eval.model]


def training_stage(directory: Path) -> str | None:
    """``pretrain`` or ``finetune`` when ``directory`` is a training stage's own output (its manifest says so)."""
    if not (directory / MANIFEST).is_file():
        return None
    stage = Manifest.read(directory).stage
    return stage if stage in TRAINING_STAGES else None


def load_run(directory: Path, card: CardConfig, recipe: dict) -> Run:
    """Read every stage the run directory holds, or a single pretrain / finetune output directory."""
    if not directory.is_dir():
        raise InputError(str(directory), "not a directory")
    run = Run(directory, card, recipe)
    alone = training_stage(directory)
    if alone is not None:
        setattr(run, alone, load_training(alone, directory))
        return run
    stage = _stages(directory)
    if "corpus" in stage:
        run.corpus = Manifest.read(stage["corpus"], "corpus")
        require(run.corpus.details, stage["corpus"] / MANIFEST, "per_source", "mixture", "dropped")
    if "tokenizer" in stage:
        run.tokenizer = Manifest.read(stage["tokenizer"], "tokenizer")
        run.fertility = read_json(stage["tokenizer"] / "fertility.json")
        require(run.fertility, stage["tokenizer"] / "fertility.json", "tokenizers", "documents", "words")
    if "tokens" in stage:
        run.tokens = Manifest.read(stage["tokens"], "tokens")
    for name in TRAINING_STAGES:
        if name in stage:
            setattr(run, name, load_training(name, stage[name]))
    if "eval" in stage:
        run.eval = load_evaluation(stage["eval"], run.final)
    if "generate" in stage:
        samples = Manifest.read(stage["generate"], "generate").outputs["samples"]
        run.samples = read_jsonl(stage["generate"] / samples)
    if not stage:
        raise InputError(
            str(directory),
            "no stage output here (corpus/, tokenizer/, tokens/, pretrain/, finetune/, "
            "eval/ or generate/): not a run directory",
        )
    return run


def _stages(directory: Path) -> dict[str, Path]:
    return {name: directory / name for name in STAGE_DIRS if (directory / name).is_dir()}
