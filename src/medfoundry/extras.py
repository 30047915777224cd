"""Optional dependencies, grouped into pip extras (``pip install 'medfoundry[serve]'``): the one place that knows
which extra brings which module, so that a missing one is a single line naming the extra to install rather than a
traceback from deep inside a stage."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from medfoundry.errors import MedfoundryError

# top-level module -> the extra of pyproject.toml that installs it
EXTRA_OF = {
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "gguf": "gguf",
    "matplotlib": "plots",
    "wandb": "tracking",
    "tensorboard": "tracking",
    "peft": "lora",
    "lm_eval": "lm-eval",
    "pyarrow": "datasets",
    "datasets": "datasets",
}


class MissingExtra(MedfoundryError):
    """A feature needs a package of an optional extra that is not installed."""


def require(module: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`MissingExtra` saying that ``feature`` needs the extra
    that brings it. Only the module itself being absent is reported so; an error raised while importing an
    installed module propagates as it is."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if exc.name is None or exc.name.partition(".")[0] != top:
            raise
        extra = EXTRA_OF[top]
        raise MissingExtra(
            f"{feature} needs {top}, which is not installed: pip install 'medfoundry[{extra}]'"
        ) from None


def pyplot(feature: str) -> ModuleType | None:
    """matplotlib's ``pyplot`` on the file-only Agg backend, or ``None`` after one line on stderr naming the
    ``plots`` extra: a missing chart never fails a stage whose results are all written."""
    try:
        matplotlib = require("matplotlib", feature)
    except MissingExtra as exc:
        print(f"warning: {exc}; skipped", file=sys.stderr, flush=True)
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
