"""``medfoundry generate``, ``chat`` and ``serve``: talk to any Hugging Face checkpoint directory (or .gguf).

:func:`add_subcommands` registers the three commands on the main CLI's subparsers. Errors that the user
can fix are :class:`~medfoundry.errors.MedfoundryError`\\ s, which the main CLI prints without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medfoundry.errors import ConfigError, InputError

API_KEY_ENV = "MEDFOUNDRY_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_subcommands(subparsers) -> None:
    """Register ``generate``, ``chat`` and ``serve`` (``subparsers`` is the main parser's ``add_subparsers()``)."""
    generate = subparsers.add_parser("generate", help="generate completions for prompts; JSONL out")
    _add_model_arguments(generate)
    generate.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or use --file)")
    generate.add_argument(
        "--file",
        help="prompts: a .jsonl file with a 'prompt' field per line (other fields are "
        "copied to the output), or a text file with one prompt per line",
    )
    generate.add_argument("--output", help="JSONL file to write (default: standard output)")
    generate.add_argument(
        "--chat", action="store_true", help="send each prompt as a user message through the chat template"
    )
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sampling_arguments(generate, temperature=0.0)
    generate.set_defaults(func=_generate)

    chat = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (/reset clears the history, /exit quits)"
    )
    _add_model_arguments(chat)
    chat.add_argument("--system", help="system message that starts the conversation")
    _add_sampling_arguments(chat, temperature=0.7)
    chat.set_defaults(func=_chat)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but the web page's shell and "
        f"/health (default: ${API_KEY_ENV}; none = open)",
    )
    serve.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429s (default 64)")
    serve.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: --max-seq-len)")
    serve.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: --max-seq-len - 1)")
    serve.add_argument(
        "--max-body-bytes", type=int, help="larger request bodies get a 413 before they are read (default 1 MiB)"
    )
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
    from medfoundry.cli import add_allow_pickle  # here, not at the top: medfoundry.cli imports this module

    command.add_argument("model", help="Hugging Face checkpoint directory or .gguf file")
    command.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="auto: bf16 where the hardware computes in bf16, else fp32",
    )
    command.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    command.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    command.add_argument("--max-batch", type=int, default=8, help="requests generated together (default 8)")
    command.add_argument(
        "--max-seq-len",
        type=int,
        help="prompt + generated tokens per request (default: the model's context, at most 2048)",
    )
    command.add_argument("--chat-template", metavar="FILE", help="Jinja chat template (default: the tokenizer's)")
    add_allow_pickle(command, "the model")


def _add_sampling_arguments(command: argparse.ArgumentParser, *, temperature: float) -> None:
    command.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    command.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    command.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    command.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    command.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating prompt or output tokens"
    )
    command.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="-2..2, per earlier occurrence in the output"
    )
    command.add_argument(
        "--presence-penalty", type=float, default=0.0, help="-2..2, once per token present in the output"
    )
    command.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)"
    )
    command.add_argument("--seed", type=int, help="makes sampling reproducible")
    command.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _sampling(args: argparse.Namespace, max_tokens: int | None = None):
    from medfoundry.serve.sampling import SamplingParams

    try:
        return SamplingParams(
            max_tokens=max_tokens or args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
            stop=tuple(args.stop),
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as exc:
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None


def _load_engine(args: argparse.Namespace):
    from medfoundry.serve.engine import Engine

    return Engine.load(
        args.model,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        allow_pickle=args.allow_pickle,
    )


def _chat_template(args: argparse.Namespace) -> str | None:
    if not args.chat_template:
        return None
    path = Path(args.chat_template)
    if not path.is_file():
        raise InputError(str(path), "chat template not found")
    return path.read_text(encoding="utf-8")


# ---- generate


def _read_prompts(args: argparse.Namespace) -> list[dict]:
    """Records with a 'prompt' field, from the arguments or the file."""
    records = [{"prompt": p} for p in args.prompts]
    if args.file:
        records += _prompts_from_file(Path(args.file))
    if not records:
        raise ConfigError("no prompts: give them as arguments or with --file")
    return records


def _prompts_from_file(path: Path) -> list[dict]:
    from medfoundry.io import iter_lines

    if not path.is_file():
        raise InputError(str(path), "prompt file not found")
    records = []
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append({"prompt": line.rstrip("\r\n")})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(str(path), f"not JSON ({exc.msg})", line_no) from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(str(path), "expected an object with a string field 'prompt'", line_no)
        records.append(record)
    return records


def _generate(args: argparse.Namespace) -> int:
    records = _read_prompts(args)
    params = _sampling(args)
    engine = _load_engine(args)
    template = _chat_template(args)
    prompts = []
    for number, record in enumerate(records, 1):
        try:
            ids = (
                engine.chat_prompt([{"role": "user", "content": record["prompt"]}], template)
                if args.chat
                else engine.encode(record["prompt"])
            )
            engine.check_prompt(ids)
        except ValueError as exc:
            raise ConfigError(f"prompt {number}: {exc}") from None
        prompts.append(ids)
    done = engine.generate(prompts, params, progress=not args.quiet and len(prompts) > 1)
    lines = [
        json.dumps(
            {
                **record,
                "completion": c.text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": len(c.token_ids),
            },
            ensure_ascii=False,
        )
        + "\n"
        for record, c in zip(records, done)
    ]
    if args.output:
        from medfoundry.io import atomic_open

        with atomic_open(args.output) as fh:
            fh.writelines(lines)
        print(f"generate: {len(lines)} completions -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.writelines(lines)
    return 0


# ---- chat


def _chat(args: argparse.Namespace) -> int:
    engine = _load_engine(args)
    template = _chat_template(args)
    if not (template or engine.tokenizer.chat_template):
        raise ConfigError(f"{args.model} has no chat template: pass one with --chat-template FILE")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"chatting with {engine.name} ({engine.precision}); /reset clears the history, /exit or Ctrl-D quits",
            file=sys.stderr,
        )
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        try:
            ids = _fit_conversation(engine, system, history, template, args.max_tokens)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        reply = _stream_reply(engine, ids, _sampling(args, min(args.max_tokens, engine.max_seq_len - len(ids))))
        history.append({"role": "assistant", "content": reply})


def _fit_conversation(
    engine, system: list[dict], history: list[dict], template: str | None, max_tokens: int
) -> list[int]:
    """The prompt of the conversation, dropping the oldest turns while it leaves too little room to answer."""
    want = min(max_tokens, engine.max_seq_len // 2)
    while True:
        try:
            ids = engine.chat_prompt(system + history, template)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if len(ids) + want <= engine.max_seq_len or len(history) == 1:
            break
        del history[:2]  # one user turn and the assistant's answer
    if len(ids) >= engine.max_seq_len:
        raise ConfigError(
            f"the message alone is {len(ids)} tokens, more than the {engine.max_seq_len} this model holds"
        )
    return ids


def _stream_reply(engine, ids: list[int], params) -> str:
    """Print the answer as it is generated; return it."""
    parts = []
    for out in engine.stream(ids, params):
        parts.append(out.text)
        print(out.text, end="", flush=True)
    print(flush=True)
    return "".join(parts)


# ---- serve


def _serve(args: argparse.Namespace) -> int:
    from medfoundry.serve.app import ServerConfig, serve
    from medfoundry.serve.guard import DEFAULT_MAX_BODY_BYTES
    from medfoundry.serve.worker import EngineWorker

    if args.max_queue < 0:
        raise ConfigError(f"--max-queue {args.max_queue}: must be >= 0")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes {args.max_body_bytes}: must be >= 1")
    if args.host not in LOOPBACK and not args.api_key:
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the model "
            f"(set --api-key or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    engine = _load_engine(args)
    config = ServerConfig(
        model_name=args.served_model_name or engine.name,
        api_key=args.api_key,
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        chat_template=_chat_template(args),
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )
    print(
        f"serve: {config.model_name} ({engine.precision}, {engine.max_batch} slots of {engine.max_seq_len} tokens) "
        f"on http://{args.host}:{args.port}/v1" + (" (API key required)" if args.api_key else ""),
        file=sys.stderr,
    )
    serve(
        EngineWorker(engine, max_queue=args.max_queue), config, host=args.host, port=args.port, log_level=args.log_level
    )
    return 0
