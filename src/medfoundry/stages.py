"""The stage registry: every config-driven stage once, with its name, config model, ``run(cfg) -> Manifest``
and the line the CLI prints. ``medfoundry <stage> CONFIG`` (:mod:`medfoundry.cli`) and ``medfoundry run``
(:mod:`medfoundry.recipe.runner`) both look stages up here, so a stage is wired in one place.

A stage's ``run`` takes its typed config (plus keyword options a command line may set, e.g. ``force``) and
returns the :class:`~medfoundry.manifest.Manifest` it wrote in its output directory. Training under
``torchrun`` runs on every process; only the first writes the manifest, and the others get ``None``. The
``multi_process`` stages (pretrain, finetune) are those that ``--nproc-per-node`` and a recipe's
``distributed:`` section start on several processes (:mod:`medfoundry.train.launch`), each running the
stage's own command.
Heavy modules are imported inside the run functions: looking a stage up costs nothing.

The registry also says what decides a stage's output, for the key ``medfoundry run`` compares to skip it
(:meth:`Stage.key_config`, :meth:`Stage.versions`): its config minus :data:`RUNTIME_ONLY` (settings of how
it runs, never of what it writes), with the defaults it resolves at run time filled in (:data:`RESOLVED`),
and the versions of the packages that compute its output (``libraries``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from medfoundry.manifest import MANIFEST, HashCache, Manifest, inputs_fingerprint, output_fingerprint

if TYPE_CHECKING:
    from medfoundry.card.config import CardRunConfig
    from medfoundry.corpus.config import CorpusConfig
    from medfoundry.eval.config import EvalConfig
    from medfoundry.generation.config import GenerateConfig
    from medfoundry.sft.config import FinetuneConfig
    from medfoundry.tokenizer.config import ExtendConfig, TokenizeConfig, TokenizerTrainConfig
    from medfoundry.train.config import PretrainConfig


@dataclass(frozen=True)
class Stage:
    name: str  # the manifest's stage and the recipe's section
    config_class: str  # "module.Class" of its config model, imported when asked for (some import torch)
    run: Callable[..., Manifest | None]
    summary: Callable[[Manifest], str]  # what the command prints when the stage is done
    command: tuple[str, ...]  # the CLI words: ("corpus", "build"), ("tokenize",), ...
    help: str
    example: str  # a config to start from, named in the command's help
    multi_process: bool = False  # runs on several processes or nodes (torchrun, Slurm): medfoundry.train.launch
    libraries: tuple[str, ...] = ()  # the packages whose version can change what the stage writes

    @property
    def config(self) -> type[BaseModel]:
        module, _, name = self.config_class.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def key_config(self, cfg: BaseModel) -> dict[str, Any]:
        """The config as far as it decides the output: without the :data:`RUNTIME_ONLY` fields, with the
        :data:`RESOLVED` defaults as this run resolves them."""
        tree = cfg.model_dump(mode="json")
        for dotted in RUNTIME_ONLY.get(self.name, ()):
            node, name = _parent(tree, dotted)
            del node[name]
        for dotted, resolve in RESOLVED.get(self.name, {}).items():
            node, name = _parent(tree, dotted)
            node[name] = resolve(cfg)
        return tree

    def versions(self) -> dict[str, str | None]:
        """The installed version of each of the stage's ``libraries`` (None: not installed)."""
        found: dict[str, str | None] = {}
        for package in self.libraries:
            try:
                found[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                found[package] = None
        return found


def _parent(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The mapping of ``tree`` that holds the field ``dotted`` (``log.every``), and the field's name in it."""
    *parents, name = dotted.split(".")
    for part in parents:
        tree = tree[part]
    return tree, name


# Per stage, the config fields (dotted) that change how it runs but never what it writes: the same data,
# tokenizer, shards, weights, scores and samples come out whatever they are. They are left out of the stage's
# key, so changing them reruns nothing (a stage killed midway resumes under the new value). Where the
# intermediate files go (work_dir, prepared_dir) is here too: a folder outside the run directory is not an
# input, although a config string naming an existing path outside it otherwise counts as one.
_TRAINING_RUNTIME = (
    "log.every",  # which steps metrics.jsonl records
    "log.tensorboard",  # also write the metrics as TensorBoard scalars
    "log.wandb",  # also log them to Weights & Biases
    "checkpoint.keep_last",  # how many checkpoints are kept: the final model is the same
    "checkpoint.async_save",  # the same checkpoint, written in the background
)
RUNTIME_ONLY: dict[str, tuple[str, ...]] = {
    "corpus": ("workers", "work_dir", "executor"),  # corpus build's own key leaves the same out
    "tokens": ("workers", "executor"),
    "pretrain": (*_TRAINING_RUNTIME, "data.verify_shards"),
    "finetune": (*_TRAINING_RUNTIME, "data.prepared_dir"),
    "eval": ("batch_size", "threads"),  # batch_size: "never changes the results" (EvalConfig)
    "generate": ("threads",),
}


def _benchmarks_dir(cfg: EvalConfig) -> str | None:
    path = cfg.benchmarks_path()  # benchmarks_dir, $MEDFOUNDRY_BENCHMARKS or a source checkout's, as the stage reads
    return str(path.resolve()) if path is not None else None


def _hub_pinned(reference: str | None) -> str | None:
    """A Hub id as the commit it resolves to now (``org/name@<commit>``; downloaded into the Hugging Face cache,
    as the stage would), so that a moved branch or tag is another input; any other reference as it is, and so is
    a name the Hub does not resolve (a folder an earlier stage has not built yet, or a model the stage will
    report missing when it runs)."""
    from medfoundry.errors import InputError
    from medfoundry.model import hub

    if reference is None or not hub.is_hub_id(reference):
        return reference
    try:
        return f"{hub.split(reference)[0]}@{hub.commit(reference)}"
    except InputError:
        return reference


def _pinned(getter: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda cfg: _hub_pinned(getter(cfg))


# Per stage, the config fields (dotted) whose default the stage resolves when it runs, each as resolved here:
# an eval that names no benchmarks folder reads $MEDFOUNDRY_BENCHMARKS (or a source checkout's), so another (or changed
# files in it, which the runner fingerprints like any input it names) is another input; a model or tokenizer
# named by a Hub id is the commit it resolves to (:func:`_hub_pinned`).
RESOLVED: dict[str, dict[str, Callable[[Any], Any]]] = {
    "tokenizer_extend": {"base_dir": _pinned(lambda cfg: cfg.base_dir)},
    "tokens": {"tokenizer_dir": _pinned(lambda cfg: cfg.tokenizer_dir)},
    "pretrain": {
        "model.init_from": _pinned(lambda cfg: cfg.model.init_from),
        "data.tokenizer_dir": _pinned(lambda cfg: cfg.data.tokenizer_dir),
    },
    "finetune": {
        "model.init_from": _pinned(lambda cfg: cfg.model.init_from),
        "data.tokenizer": _pinned(lambda cfg: cfg.data.tokenizer),
    },
    "eval": {"benchmarks_dir": _benchmarks_dir, "models": lambda cfg: [_hub_pinned(m) for m in cfg.models]},
    "generate": {"model": _pinned(lambda cfg: cfg.model)},
}


def input_fingerprints(*specs: str | None) -> dict[str, str]:
    """Fingerprints of a stage's inputs: an earlier stage's output by its manifest, another local file or folder
    by content (each file read once per size and modification time: a 7B base model's 14 GB are not hashed
    again by every run that continues it); a Hub id by the commit of its snapshot in the Hugging Face cache."""
    from medfoundry.errors import InputError
    from medfoundry.model import hub
    from medfoundry.model.load import cache_root

    found = {}
    with HashCache(cache_root() / "input_digests.json") as hashes:
        for spec in specs:
            if spec is None or spec in found:
                continue
            path = Path(spec)
            if (path / MANIFEST).is_file():
                found[spec] = output_fingerprint(path)
            elif path.exists():  # README.md: the card a model gets
                found[spec] = inputs_fingerprint(path, skip=lambda name: name == "README.md", hashes=hashes)
            elif hub.is_hub_id(spec):
                try:
                    found[spec] = f"hub:{hub.commit(spec, cached=True)}"  # what the stage used: no network now
                except InputError:
                    pass
    return found


# ---------------------------------------------------------------------------------------------- run functions


def _corpus(cfg: CorpusConfig, *, force: bool = False) -> Manifest:
    from medfoundry.corpus.build import build_corpus

    return build_corpus(cfg, force=force)


def _tokenizer(cfg: TokenizerTrainConfig) -> Manifest:
    from medfoundry.tokenizer.train import train_tokenizer

    return train_tokenizer(cfg)


def _tokenizer_extend(cfg: ExtendConfig) -> Manifest:
    from medfoundry.tokenizer.extend import extend_tokenizer

    return extend_tokenizer(cfg)


def _tokens(cfg: TokenizeConfig) -> Manifest:
    from medfoundry.tokenizer.shards import tokenize_corpus

    return tokenize_corpus(
        cfg.corpus_dir,
        cfg.tokenizer_dir,
        cfg.output_dir,
        eos_token=cfg.eos_token,
        dtype=cfg.dtype,
        workers=cfg.workers,
        executor=cfg.executor,
    )


def _training_manifest(stage: str, cfg: PretrainConfig | FinetuneConfig, summary: dict, inputs, seconds) -> Manifest:
    model = "model" if stage == "pretrain" or cfg.lora is None or cfg.lora.merge else "adapter"
    manifest = Manifest(
        stage=stage,
        config=cfg.model_dump(mode="json"),
        inputs=inputs,
        outputs={
            model: model,
            "checkpoints": "checkpoints",
            "metrics": "metrics.jsonl",
            "summary": "summary.json",
            "run": "run.json",
        },
        counts={"steps": summary["steps"], **({"tokens": summary["tokens"]} if summary.get("tokens") else {})},
        timings={"total_s": seconds},
        details=summary,
    )
    manifest.write(cfg.output_dir)
    return manifest


def _pretrain(cfg: PretrainConfig) -> Manifest | None:
    from medfoundry.train.loop import pretrain

    start = time.perf_counter()
    summary = pretrain(cfg)
    if not summary:  # not the first process
        return None
    inputs = input_fingerprints(cfg.data.tokens_dir, cfg.data.tokenizer_dir, cfg.model.init_from)
    return _training_manifest("pretrain", cfg, summary, inputs, time.perf_counter() - start)


def _finetune(cfg: FinetuneConfig) -> Manifest | None:
    from medfoundry.sft.finetune import finetune

    start = time.perf_counter()
    summary = finetune(cfg)
    if not summary:  # not the first process
        return None
    inputs = input_fingerprints(str(cfg.prepared_path()), cfg.model.init_from)
    return _training_manifest("finetune", cfg, summary, inputs, time.perf_counter() - start)


def _eval(cfg: EvalConfig, *, progress: bool = True) -> Manifest:
    from medfoundry.eval.run import evaluate

    evaluate(cfg, progress=progress)
    return Manifest.read(cfg.output_dir, "eval")


def _generate(cfg: GenerateConfig, *, progress: bool = False) -> Manifest | None:
    """Records to ``cfg.output`` with a manifest beside it; with no output (``medfoundry generate`` on a terminal),
    to standard output, and no manifest: nothing was written."""
    from medfoundry.generation.run import generate

    if not cfg.output:
        generate(cfg, progress=progress)
        return None
    start = time.perf_counter()
    result = generate(cfg, progress=progress)
    output = Path(cfg.output)
    manifest = Manifest(
        stage="generate",
        config=cfg.model_dump(mode="json"),
        inputs=input_fingerprints(cfg.model, cfg.prompts_file, cfg.chat_template),
        outputs={"samples": output.name},
        counts={"prompts": result["prompts"], "completion_tokens": result["completion_tokens"]},
        timings={"total_s": time.perf_counter() - start},
        details={"chat": result["chat"]},
    )
    manifest.write(output.parent)
    return manifest


def _card(cfg: CardRunConfig) -> Manifest:
    from medfoundry.card.write import card_stage

    return card_stage(cfg)


# ---------------------------------------------------------------------------------------------- summaries


def _corpus_summary(m: Manifest) -> str:
    c = m.counts
    return (
        f"corpus: {c['documents_in']:,} documents in, {c['documents_train']:,} train / {c['documents_val']:,} val "
        f"out -> {m.config['output_dir']} (report: {Path(m.config['output_dir']) / m.outputs['report']})"
    )


def _tokenizer_summary(m: Manifest) -> str:
    fertility = m.details["fertility"]
    ours = fertility["medfoundry"]["tokens_per_word"]
    others = ", ".join(f"{n} {f['tokens_per_word']:.3f}" for n, f in fertility.items() if n != "medfoundry")
    return (
        f"tokenizer: {m.counts['vocab_size']:,} tokens -> {m.config['output_dir']}; tokens/word on val {ours:.3f}"
        + (f" (vs {others})" if others else "")
        + f"; report: {Path(m.config['output_dir']) / m.outputs['fertility']}"
    )


def _extend_summary(m: Manifest) -> str:
    c, fertility = m.counts, m.details["fertility"]
    return (
        f"tokenizer: {c['base_vocab_size']:,} -> {c['vocab_size']:,} tokens ({c['words_added']:,} words) -> "
        f"{m.config['output_dir']}; tokens/word on val {fertility['base']['tokens_per_word']:.3f} -> "
        f"{fertility['extended']['tokens_per_word']:.3f}"
    )


def _tokens_summary(m: Manifest) -> str:
    c = m.counts
    splits = ", ".join(
        f"{split} {c[f'{split}_tokens']:,} tokens in {c[f'{split}_shards']} shard(s)" for split in m.outputs
    )
    return (
        f"tokens: {splits} ({m.details['dtype']}, {m.details['tokens_per_s']:,} tokens/s) -> {m.config['output_dir']}"
    )


def _pretrain_summary(m: Manifest) -> str:
    s = m.details
    val = (
        f", validation loss {s['val_loss']:.3f} (ppl {s['val_ppl']:.1f}, {s['val_bpb']:.3f} bits/byte)"
        if "val_loss" in s
        else ""
    )
    model = Path(m.config["output_dir"]) / "model"
    return f"pretrain: {s['steps']} steps{val}, {s.get('median_tok_s', 0):,.0f} tokens/s -> {model}"


def _finetune_summary(m: Manifest) -> str:
    s = m.details
    val = f", validation loss {s['val_loss']:.3f} on response tokens" if "val_loss" in s else ""
    model = next(name for name in ("model", "adapter") if name in m.outputs)
    return (
        f"finetune: {s['steps']} steps{val}, {s.get('median_tok_s', 0):,.0f} tokens/s -> "
        f"{Path(m.config['output_dir']) / model}"
    )


def _eval_summary(m: Manifest) -> str:
    table = m.details["table"]
    rows = [table["header"], *table["rows"]]
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    out = Path(m.config["output_dir"])
    lines += _lm_eval_lines(m.details.get("lm_eval", {}))
    lines += [
        f"{name}: {out / name / 'results.json'} (questions: samples.jsonl, report: results.md)"
        for name in m.details["models"]
    ]
    return "\n".join([*lines, f"eval: comparison -> {out / m.outputs['report']}"])


def _lm_eval_lines(results: dict) -> list[str]:
    """One line per model and lm-eval task: its metrics as lm-eval names them (``acc,none`` is shown ``acc``),
    with their standard errors."""
    lines = []
    for model, tasks in results.items():
        for task, metrics in tasks.items():
            shown = [
                f"{key.partition(',')[0]} {value:.4f}"
                + (f" ± {err:.4f}" if isinstance(err := metrics.get(key.replace(",", "_stderr,", 1)), float) else "")
                for key, value in metrics.items()
                if "," in key and "_stderr," not in key and isinstance(value, float)
            ]
            lines.append(f"lm-eval: {model}: {task}: {', '.join(shown)}")
    return lines


def _generate_summary(m: Manifest) -> str:
    return f"generate: {m.counts['prompts']} completions -> {m.config['output']}"


def _card_summary(m: Manifest) -> str:
    return f"card: {m.details['card']}"


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="corpus",
            config_class="medfoundry.corpus.config.CorpusConfig",
            run=_corpus,
            summary=_corpus_summary,
            command=("corpus", "build"),
            help="build a corpus from a YAML config",
            example="recipes/quickstart_corpus.yaml",
            libraries=("lxml", "py3langid"),
        ),
        Stage(
            name="tokenizer",
            config_class="medfoundry.tokenizer.config.TokenizerTrainConfig",
            run=_tokenizer,
            summary=_tokenizer_summary,
            command=("tokenizer", "train"),
            help="train a byte-level BPE on a corpus's train split",
            example="recipes/quickstart_tokenizer.yaml",
            libraries=("tokenizers",),
        ),
        Stage(
            name="tokenizer_extend",
            config_class="medfoundry.tokenizer.config.ExtendConfig",
            run=_tokenizer_extend,
            summary=_extend_summary,
            command=("tokenizer", "extend"),
            help="add domain tokens to an existing tokenizer, keeping its ids",
            example="recipes/quickstart_tokenizer_extend.yaml",
            libraries=("tokenizers",),
        ),
        Stage(
            name="tokens",
            config_class="medfoundry.tokenizer.config.TokenizeConfig",
            run=_tokens,
            summary=_tokens_summary,
            command=("tokenize",),
            help="pack a corpus into memory-mappable token shards",
            example="recipes/quickstart_tokens.yaml",
            libraries=("tokenizers",),
        ),
        Stage(
            name="pretrain",
            config_class="medfoundry.train.config.PretrainConfig",
            run=_pretrain,
            summary=_pretrain_summary,
            command=("pretrain",),
            help="pretrain or continue pretraining a GPT-2, LLaMA or BLOOM model (--nproc-per-node N: N processes)",
            example="recipes/quickstart_pretrain.yaml",
            multi_process=True,
            libraries=("torch", "transformers"),
        ),
        Stage(
            name="finetune",
            config_class="medfoundry.sft.config.FinetuneConfig",
            run=_finetune,
            summary=_finetune_summary,
            command=("finetune",),
            help="supervised fine-tuning: chat templates, prompt-loss masking, packing, mixtures, LoRA "
            "(--nproc-per-node N: N processes)",
            example="recipes/pubmedqa_finetune.yaml",
            multi_process=True,
            libraries=("torch", "transformers", "tokenizers"),
        ),
        Stage(
            name="eval",
            config_class="medfoundry.eval.config.EvalConfig",
            run=_eval,
            summary=_eval_summary,
            command=("eval",),
            help="evaluate models: perplexity, multiple choice (log-likelihood) and chain-of-thought",
            example="recipes/quickstart_eval.yaml",
            libraries=("torch", "transformers", "tokenizers"),
        ),
        Stage(
            name="generate",
            config_class="medfoundry.generation.config.GenerateConfig",
            run=_generate,
            summary=_generate_summary,
            command=("generate",),
            help="generate completions for prompts; JSONL out",
            example="recipes/quickstart.yaml's generate section",
            libraries=("torch", "transformers", "tokenizers"),
        ),
        Stage(
            name="card",
            config_class="medfoundry.card.config.CardRunConfig",
            run=_card,
            summary=_card_summary,
            command=("card",),
            help="write MODEL_CARD.md (Hugging Face front matter and model-index) from a run directory's manifests",
            example="a run directory",
            libraries=("torch", "transformers", "tokenizers", "huggingface_hub"),  # the card lists their versions
        ),
    )
}
