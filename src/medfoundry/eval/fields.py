"""Documents, field paths and Jinja templates: the vocabulary task definitions are written in.

Templates render exactly as lm-eval's ``doc_to_text`` strings do (same Jinja settings: undefined
names are errors, a trailing newline is kept, and the ``regex_replace`` filter), so a prompt copied
from an lm-eval task YAML produces the same bytes here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.sandbox

from medfoundry.errors import ConfigError


@dataclass(frozen=True)
class Doc:
    """One benchmark item: a stable id (for few-shot seeding and samples.jsonl) and its fields."""

    id: str
    fields: dict


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, string, count=count)


# Sandboxed: a task file may come from anyone, and a plain Environment lets a template reach any Python object
# (``''.__class__.__mro__[1].__subclasses__()``) and run code. The immutable sandbox allows what prompts use
# (fields, indexing, filters, string methods) and refuses underscore attributes and methods that modify a value.
_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
)
_ENV.filters["regex_replace"] = _regex_replace


@functools.lru_cache(maxsize=512)
def _compile(template: str, where: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{where}: template syntax error on its line {exc.lineno}: {exc.message}") from None


def render(template: str, fields: dict, where: str) -> str:
    """Render ``template`` over a document's fields; ``where`` (file: field) names the template in errors."""
    try:
        return _compile(template, where).render(**fields)
    except jinja2.sandbox.SecurityError as exc:
        raise ConfigError(f"{where}: refused by the template sandbox: {exc}") from None
    except jinja2.UndefinedError as exc:
        raise ConfigError(
            f"{where}: {exc.message} (the documents have the fields {', '.join(sorted(fields))})"
        ) from None
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{where}: template failed on a document: {exc}") from None


def is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def lookup(record: Any, path: str, where: str) -> Any:
    """``record`` followed along a dotted path: mapping keys, and integer indices into lists."""
    value = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            known = f"; the record has the fields {', '.join(sorted(record))}" if isinstance(record, dict) else ""
            raise ConfigError(f"{where}: no field {path!r}{known}")
    return value


def resolve(record: dict, value: str | list | dict, where: str) -> Any:
    """One field mapping value: a template rendered to a string, a path, or a list / mapping of those."""
    if isinstance(value, list):
        return [resolve(record, item, where) for item in value]
    if isinstance(value, dict):
        return {key: resolve(record, item, where) for key, item in value.items()}
    if is_template(value):
        return render(value, record, where)
    return lookup(record, value, where)


def map_fields(record: dict, mapping: dict, where: str) -> dict:
    """The record with the mapped fields added (or replaced); every value is resolved on the original record."""
    return {**record, **{name: resolve(record, value, f"{where}.{name}") for name, value in mapping.items()}}
