"""Typed configuration: YAML files and ``key.path=value`` overrides validated into pydantic models.

Every stage defines its config as :class:`StrictModel` subclasses. Unknown keys are errors (a typo
must not be silently ignored), and validation errors name the file, the dotted field path, what
was given and what is expected.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medfoundry.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

BENCHMARKS_ENV = "MEDFOUNDRY_BENCHMARKS"


def benchmarks_from_env() -> str | None:
    """``$MEDFOUNDRY_BENCHMARKS``: the folder of the evaluation sets (laid out like ``../shared/data/benchmarks``)
    that every config naming none uses: eval's tasks, corpus decontamination and the SFT test-overlap check, so
    that one setting keeps training data and evaluation on the same files."""
    return os.environ.get(BENCHMARKS_ENV) or None


def benchmarks_dir_from_env(section: dict) -> dict:
    """A config section's raw fields with ``benchmarks_dir`` taken from :func:`benchmarks_from_env` when unset:
    for the before-validators of the configs that read the folder only in some settings (they call it there)."""
    if section.get("benchmarks_dir") is not None:
        return section
    return {**section, "benchmarks_dir": benchmarks_from_env()}


class StrictModel(BaseModel):
    """Base for config sections: unknown fields rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (so ``3``, ``true``, ``[a, b]`` work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. dedup.near.threshold=0.7")
        key, raw = item.split("=", 1)
        try:
            _set_dotted(tree, key.strip(), yaml.safe_load(raw))
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {getattr(exc, 'problem', exc)}") from None
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            raise ConfigError(f"override {item!r}: cannot set {key!r} ({exc})") from exc
    return tree


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names at the location of an 'extra field' error, for did-you-mean hints."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            names = _field_names(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid fields: {', '.join(names)}"
            lines.append(f"  {dotted}: unknown field; {hint}")
        elif err["type"] == "missing":
            lines.append(f"  {dotted}: required field is missing")
        elif err["type"] == "value_error" and isinstance(given, dict):  # model-level check: do not echo the section
            lines.append(f"  {dotted}: {err['msg']}")
        else:
            lines.append(f"  {dotted}: {err['msg']} (got {given!r})")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model: type[M], tree: dict, source: str = "<config>") -> M:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """Load ``path`` (YAML), apply overrides, validate into ``model``.

    Relative paths inside the file are taken from the working directory, as with any CLI tool.
    """
    tree = load_yaml(path) if path else {}
    tree = apply_overrides(tree, overrides or [])
    return validate(model, tree, str(path or "<overrides>"))


def add_allow_pickle(command, where: str) -> None:
    """The ``--allow-pickle`` flag of a command that loads model weights (an ``argparse`` parser), worded alike
    everywhere; here, at the bottom layer, so that every package's command can use it."""
    command.add_argument(
        "--allow-pickle",
        action="store_true",
        help=f"allow pickled weights (pytorch_model.bin) in {where}, loaded with torch.load(weights_only=True); "
        "by default only safetensors load, since unpickling can run code",
    )
