"""The one ``manifest.json`` every stage writes, and the one way to fingerprint what a stage read.

A :class:`Manifest` holds what every stage has (stage name, medfoundry version, config, input
fingerprints, outputs, counts, timings, and the key a rerun compares) in typed fields, and what only
one stage has in ``details``, read by key. It is written last, atomically, so a directory with a
readable manifest is a finished output.

:func:`inputs_fingerprint` is the single "did this input change" function. It covers every file an
input names (a file, a folder's files, or a glob's matches), each by its name relative to the input,
its size and either

- its content (``by="content"``, the default): an xxh3-128 digest, remembered per (path, size,
  modification time) in this process and, given a :class:`HashCache`, across runs, so unchanged big
  inputs are read once. A copied or moved input keeps its fingerprint; or
- its modification time (``by="stat"``): no read at all, for a check that runs over every file a
  whole recipe names (``medfoundry run``), where touching a file is reason enough to rerun its stage.

An input that is another stage's output is fingerprinted by that stage's ``manifest.json``: it
changes exactly when the output was rebuilt.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medfoundry import __version__
from medfoundry.errors import InputError
from medfoundry.io import file_checksum, write_json

MANIFEST = "manifest.json"


class Manifest(BaseModel):
    """What a stage made, from what, and how long it took; ``directory/manifest.json``.

    In code, the version is this package's and the mappings default to empty; a file must have every field
    (:meth:`read` refuses one this version did not write, never reads it leniently)."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="the stage that wrote it: corpus, tokenizer, tokenizer_extend, tokens, ...")
    medfoundry_version: str = __version__
    key: str | None = Field(None, description="hash of what decides the output; equal key, nothing to redo")
    config: dict[str, Any] = Field(default_factory=dict, description="the stage's config as run")
    inputs: dict[str, str] = Field(default_factory=dict, description="each input -> its inputs_fingerprint")
    outputs: dict[str, str] = Field(default_factory=dict, description="name -> path, relative to the directory")
    counts: dict[str, int] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict, description="seconds; total_s is the whole stage")
    details: dict[str, Any] = Field(default_factory=dict, description="what only this stage reports")

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike, stage: str | tuple[str, ...] | None = None) -> Manifest:
        """``directory/manifest.json``; missing, invalid, or written by another stage than ``stage`` is an
        :class:`InputError` naming the file."""
        path = Path(directory) / MANIFEST
        wanted = (stage,) if isinstance(stage, str) else stage
        missing = f"not found: the {' or '.join(wanted)} stage has not finished" if wanted else "not found"
        data = read_json(path, missing)
        absent = [name for name in cls.model_fields if name not in data]
        if absent:
            raise InputError(str(path), f"not a medfoundry manifest: no {', '.join(absent)} field")
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "<root>"
            raise InputError(str(path), f"not a medfoundry manifest: {field}: {err['msg']}") from None
        if wanted and manifest.stage not in wanted:
            raise InputError(str(path), f"written by the {manifest.stage} stage, expected {' or '.join(wanted)}")
        return manifest

    @classmethod
    def current(cls, directory: str | os.PathLike, key: str) -> Manifest | None:
        """The directory's manifest when it exists and records ``key`` (its output is up to date), else None."""
        if not (Path(directory) / MANIFEST).is_file():
            return None
        try:
            manifest = cls.read(directory)
        except InputError:
            return None  # unreadable: rebuilt, which rewrites it
        return manifest if manifest.key == key and manifest.medfoundry_version == __version__ else None


def read_json(path: Path, missing: str = "not found") -> dict:
    """A JSON object from ``path``; absent, invalid or not an object is an :class:`InputError`."""
    if not path.is_file():
        raise InputError(str(path), missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(str(path), f"not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"invalid JSON: {exc.msg}", exc.lineno) from None
    if not isinstance(data, dict):
        raise InputError(str(path), f"expected a JSON object, got {type(data).__name__}")
    return data


def content_key(*parts: object) -> str:
    """Stable hash (xxh3-128, hex) of JSON-serializable parts: configs, input fingerprints, the version."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return xxhash.xxh3_128_hexdigest(blob.encode())


# ------------------------------------------------------------------------------------------ fingerprints

_DIGESTS: dict[str, str] = {}  # this process's memo: "path|size|mtime" -> content digest


class HashCache:
    """Content digests remembered across runs in a JSON file keyed by (path, size, modification time)."""

    def __init__(self, cache_file: str | os.PathLike):
        self.cache_file = Path(cache_file)
        try:
            self.digests = json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}
        except (OSError, ValueError):
            self.digests = {}  # a cache only: a damaged one is rebuilt
        if not isinstance(self.digests, dict):
            self.digests = {}

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc) -> None:
        write_json(self.cache_file, self.digests)


def file_digest(path: Path, hashes: HashCache | None = None) -> str:
    """xxh3-128 of a file's bytes, not re-read while its size and modification time stay the same."""
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    known = (hashes.digests if hashes is not None else {}).get(memo_key) or _DIGESTS.get(memo_key)
    if known is None:
        known = file_checksum(path)
    _DIGESTS[memo_key] = known
    if hashes is not None:
        hashes.digests[memo_key] = known
    return known


def named_files(spec: str | os.PathLike, names: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """(name relative to the input, path) of every file ``spec`` names, sorted: the file itself, a folder's
    files (hidden ones skipped: temporaries of atomic writes, caches), or a glob's matches; with ``names``,
    only those files of the folder (the ones that exist). A missing input is an :class:`InputError`."""
    text = str(spec)
    if any(c in text for c in "*?["):
        found = []
        for root in (Path(p) for p in sorted(glob.glob(text))):
            inside = named_files(root, names)
            found += inside if root.is_file() else [(f"{root.name}/{name}", path) for name, path in inside]
        return found
    root = Path(text)
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise InputError(text, "not found")
    if names is not None:
        return [(name, root / name) for name in names if (root / name).is_file()]
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), path))
    return sorted(found)


def inputs_fingerprint(
    spec: str | os.PathLike,
    *,
    names: Iterable[str] | None = None,
    skip: Callable[[str], bool] | None = None,
    by: Literal["content", "stat"] = "content",
    hashes: HashCache | None = None,
) -> str:
    """One xxh3-128 digest of every file ``spec`` names (see :func:`named_files`): each file's relative name,
    size, and content digest (``by="content"``) or modification time (``by="stat"``). ``skip`` leaves out
    files by relative name (a model's README.md, which the card rewrites)."""
    digest = xxhash.xxh3_128()
    for name, path in named_files(spec, names):
        if skip is not None and skip(name):
            continue
        stat = path.stat()
        mark = file_digest(path, hashes) if by == "content" else str(stat.st_mtime_ns)
        digest.update(f"{name}\0{stat.st_size}\0{mark}\n".encode())
    return digest.hexdigest()


def output_fingerprint(directory: str | os.PathLike) -> str:
    """The fingerprint of a stage's output as an input of a later stage: that of its manifest."""
    return inputs_fingerprint(Path(directory) / MANIFEST)
