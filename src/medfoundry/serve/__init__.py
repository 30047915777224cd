"""Generation and serving: the batching engine, ``generate`` / ``chat``, and an OpenAI-compatible server.

Names are imported on first use, so that registering the CLI commands (``medfoundry.serve.cli``) does not
load torch and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": "engine",
    "Completion": "engine",
    "Output": "engine",
    "Request": "engine",
    "SamplingParams": "sampling",
    "EngineWorker": "worker",
    "ServerConfig": "app",
    "create_app": "app",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"medfoundry.serve.{_EXPORTS[name]}"), name)
