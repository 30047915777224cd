"""``medfoundry generate`` and ``chat``: their flags fill a :class:`~medfoundry.generation.config.GenerateConfig`
or :class:`~medfoundry.generation.config.ChatConfig`; the model and sampling flags are shared with ``serve``.

Errors that the user can fix are :class:`~medfoundry.errors.MedfoundryError`\\ s, which the main CLI prints
without a traceback; a flag's invalid value is named by its flag (``--top-p: ...``).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from medfoundry.config import add_allow_pickle, validate
from medfoundry.errors import ConfigError
from medfoundry.generation.config import ChatConfig, EngineConfig, GenerateConfig, SamplingConfig


def add_generate_arguments(generate: argparse.ArgumentParser) -> None:
    """The flags of ``medfoundry generate`` (the registry's generate stage, see :func:`generate_config`)."""
    add_engine_arguments(generate)
    generate.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or use --file)")
    generate.add_argument("--file", help=GenerateConfig.model_fields["prompts_file"].description)
    generate.add_argument(
        "--output", help="JSONL file to write, with manifest.json beside it (default: standard output)"
    )
    generate.add_argument(
        "--chat", action="store_true", help="send each prompt as a user message through the chat template"
    )
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sampling_arguments(generate, temperature=0.0)


def generate_config(args: argparse.Namespace) -> GenerateConfig:
    """The :class:`GenerateConfig` of :func:`add_generate_arguments`' flags."""
    fields = {
        **engine_fields(args),
        "prompts": args.prompts,
        "prompts_file": args.file,
        "chat": args.chat,
        "sampling": sampling_config(args),
        "output": args.output,
    }
    return validate(GenerateConfig, fields, "generate")


def add_subcommands(subparsers) -> None:
    """Register ``chat`` (``subparsers`` is the main parser's ``add_subparsers()``)."""
    chat = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (/reset clears the history, /exit quits)"
    )
    add_engine_arguments(chat)
    chat.add_argument("--system", help="system message that starts the conversation")
    add_sampling_arguments(chat, temperature=0.7)
    chat.set_defaults(func=_chat)


def add_engine_arguments(command: argparse.ArgumentParser) -> None:
    """The flags of :class:`EngineConfig` (see :func:`engine_fields`)."""
    fields = EngineConfig.model_fields
    command.add_argument("model", help=fields["model"].description)
    command.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help=fields["precision"].description
    )
    command.add_argument("--device", default="auto", help=fields["device"].description)
    command.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    command.add_argument("--max-batch", type=int, default=8, help="requests generated together (default 8)")
    command.add_argument("--max-seq-len", type=int, help=fields["max_seq_len"].description)
    command.add_argument("--chat-template", metavar="FILE", help=fields["chat_template"].description)
    command.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help=fields["compile"].description)
    add_allow_pickle(command, "the model")


def engine_fields(args: argparse.Namespace) -> dict:
    """The :class:`EngineConfig` fields given by :func:`add_engine_arguments`' flags."""
    return {name: getattr(args, name) for name in EngineConfig.model_fields}


def add_sampling_arguments(command: argparse.ArgumentParser, *, temperature: float) -> None:
    """The flags of :class:`SamplingConfig` (see :func:`sampling_config`)."""
    fields = SamplingConfig.model_fields
    command.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    command.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    command.add_argument("--top-k", type=int, default=0, help=fields["top_k"].description)
    command.add_argument("--top-p", type=float, default=1.0, help=fields["top_p"].description)
    command.add_argument("--repetition-penalty", type=float, default=1.0, help=fields["repetition_penalty"].description)
    command.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="-2..2, " + fields["frequency_penalty"].description
    )
    command.add_argument(
        "--presence-penalty", type=float, default=0.0, help="-2..2, " + fields["presence_penalty"].description
    )
    command.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)"
    )
    command.add_argument("--seed", type=int, help="makes sampling reproducible")
    command.add_argument("--ignore-eos", action="store_true", help=fields["ignore_eos"].description)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The :class:`SamplingConfig` of :func:`add_sampling_arguments`' flags; an invalid value names its flag."""
    try:
        return SamplingConfig(**{name: getattr(args, name) for name in SamplingConfig.model_fields})
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
        raise ConfigError(f"{flag} {error['input']!r}: {error['msg']}") from None


# ---- chat


def _chat(args: argparse.Namespace) -> int:
    cfg = validate(
        ChatConfig, {**engine_fields(args), "system": args.system, "sampling": sampling_config(args)}, "chat"
    )
    return chat(cfg)


def chat(cfg: ChatConfig) -> int:
    """A conversation on standard input and output; each reply is streamed as it is generated."""
    engine = cfg.load_engine()
    template = cfg.template()
    if not (template or engine.tokenizer.chat_template):
        raise ConfigError(f"{cfg.model} has no chat template: pass one with --chat-template FILE")
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
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
            ids = _fit_conversation(engine, system, history, template, cfg.sampling.max_tokens)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        room = min(cfg.sampling.max_tokens, engine.max_seq_len - len(ids))
        reply = _stream_reply(engine, ids, cfg.sampling.model_copy(update={"max_tokens": room}))
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


def _stream_reply(engine, ids: list[int], params: SamplingConfig) -> str:
    """Print the answer as it is generated; return it."""
    parts = []
    for out in engine.stream(ids, params):
        parts.append(out.text)
        print(out.text, end="", flush=True)
    print(flush=True)
    return "".join(parts)
