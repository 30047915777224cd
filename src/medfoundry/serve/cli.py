"""``medfoundry serve``: its flags fill a :class:`~medfoundry.serve.config.ServeConfig`, which :func:`serve_model`
runs. :func:`add_subcommands` registers it on the main CLI's subparsers, with ``chat``
(:mod:`medfoundry.generation.cli`), which shares its model and sampling flags (``generate`` is a stage of the
registry, :mod:`medfoundry.stages`).
"""

from __future__ import annotations

import argparse
import sys

from medfoundry.config import validate
from medfoundry.extras import require
from medfoundry.generation.cli import add_engine_arguments, engine_fields
from medfoundry.generation.cli import add_subcommands as add_generation_commands
from medfoundry.serve.config import DEFAULT_MAX_LOGPROBS, ServeConfig, is_loopback, run_name

_SERVER_FIELDS = (
    "host",
    "port",
    "api_key_file",
    "insecure_no_key",
    "allowed_hosts",
    "served_model_name",
    "max_queue",
    "max_tokens",
    "max_prompt_tokens",
    "max_body_bytes",
    "max_logprobs",
    "request_timeout",
    "log_level",
)


def add_subcommands(subparsers) -> None:
    """Register ``chat`` and ``serve`` (``subparsers`` is the main parser's ``add_subparsers()``)."""
    add_generation_commands(subparsers)
    fields = ServeConfig.model_fields
    serve = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
        allow_abbrev=False,  # else "--api-key SECRET", a flag no more, would be read as --api-key-file SECRET
    )
    add_engine_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help=fields["host"].description)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-file", metavar="FILE", help=fields["api_key_file"].description)
    serve.add_argument("--insecure-no-key", action="store_true", help=fields["insecure_no_key"].description)
    serve.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        metavar="HOST",
        help=fields["allowed_hosts"].description + " (repeatable)",
    )
    serve.add_argument("--served-model-name", help=fields["served_model_name"].description)
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429s (default 64)")
    serve.add_argument("--max-tokens", type=int, help=fields["max_tokens"].description)
    serve.add_argument("--max-prompt-tokens", type=int, help=fields["max_prompt_tokens"].description)
    serve.add_argument("--max-body-bytes", type=int, help=fields["max_body_bytes"].description + " (default 1 MiB)")
    serve.add_argument(
        "--max-logprobs", type=int, help=fields["max_logprobs"].description + f" (default {DEFAULT_MAX_LOGPROBS})"
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help=fields["request_timeout"].description + " (default 600)",
    )
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in _SERVER_FIELDS if getattr(args, name) is not None}
    return serve_model(validate(ServeConfig, {**engine_fields(args), **given}, "serve"))


def serve_model(cfg: ServeConfig) -> int:
    """Load the model and serve it until interrupted."""
    for module in ("fastapi", "uvicorn"):
        require(module, "medfoundry serve")
    from medfoundry.serve.app import ServerConfig, serve
    from medfoundry.serve.worker import EngineWorker

    key = cfg.key()
    cfg.check_exposure(key)
    if key is None and not is_loopback(cfg.host):
        print(
            f"warning: serving on {cfg.host} without an API key (--insecure-no-key): anyone who can reach this port "
            "can use the model (requests naming another Host than localhost, --host or --allowed-host are refused)",
            file=sys.stderr,
        )
    engine = cfg.load_engine(long_lived=True)
    if engine.compiled:
        print("serve: compiling the decode step before listening (--compile off starts at once)", file=sys.stderr)
        print(f"serve: decode step compiled in {engine.warmup():.0f} s", file=sys.stderr)
    config = ServerConfig(
        model_name=cfg.served_model_name or run_name(cfg.model) or engine.name,
        api_key=key,
        allowed_hosts=(*cfg.allowed_hosts, cfg.host),
        max_tokens=cfg.max_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        chat_template=cfg.template(),
        max_body_bytes=cfg.max_body_bytes,
        max_logprobs=cfg.max_logprobs,
    )
    print(
        f"serve: {config.model_name} ({engine.precision}, {engine.max_batch} slots of {engine.max_seq_len} tokens) "
        f"on http://{cfg.host}:{cfg.port}/v1" + (" (API key required)" if key else ""),
        file=sys.stderr,
    )
    worker = EngineWorker(engine, max_queue=cfg.max_queue, request_timeout=cfg.request_timeout)
    serve(worker, config, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
