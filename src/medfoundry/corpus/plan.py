"""Turn the configured sources into work units: one task per file, several for big line-based files.

The plan is deterministic (sorted globs), so the same config always gives the same task ranks;
that is what lets datatrove skip completed tasks on a re-run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from medfoundry.corpus.config import CorpusConfig, SourceConfig
from medfoundry.errors import ConfigError
from medfoundry.io import write_json

LINE_BASED = {"jsonl"}
_GZ_RATIO = 4  # typical text compression ratio, to estimate the size of a .gz file's content
MAX_PARTS = 8  # every part scans the whole file (a gzip stream cannot be entered midway): more only adds scanning


@dataclass(frozen=True)
class WorkUnit:
    """One task: a file (or one of ``parts`` interleaved line subsets of it).

    ``file_index`` numbers the files of the whole plan in order; with a record's line it gives the
    record's place in read order, whatever the task split. ``label`` is the file's path relative to
    its source's common folder, unique within the source, used in ids of records without one.
    """

    source: str
    kind: str
    path: str
    label: str
    file_index: int
    part: int = 0
    parts: int = 1


def expand_paths(source: SourceConfig) -> list[Path]:
    files: list[Path] = []
    for pattern in source.paths:
        hits = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [Path(h) for h in hits if Path(h).is_file()]
        if not matched:
            raise ConfigError(f"sources[{source.name}].paths: {pattern!r} matches no file")
        files.extend(matched)
    return list(dict.fromkeys(files))


def _parts_for(path: Path, kind: str, split_mb: float) -> int:
    if kind not in LINE_BASED:
        return 1
    size = path.stat().st_size * (_GZ_RATIO if path.name.endswith(".gz") else 1)
    return max(1, min(MAX_PARTS, math.ceil(size / (split_mb * 2**20))))


def _labels(paths: list[Path]) -> list[str]:
    if len(paths) == 1:
        return [paths[0].name]
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    return [str(p.resolve().relative_to(root)) for p in paths]


def plan_units(cfg: CorpusConfig) -> list[WorkUnit]:
    units: list[WorkUnit] = []
    file_index = 0
    for source in cfg.sources:
        paths = expand_paths(source)
        for path, label in zip(paths, _labels(paths)):
            parts = _parts_for(path, source.kind, cfg.split_mb)
            units.extend(
                WorkUnit(source.name, source.kind, str(path), label, file_index, p, parts) for p in range(parts)
            )
            file_index += 1
    return units


def file_sha256(path: Path, cache: dict) -> str:
    """sha256 of a file, memoized on (size, mtime) so re-runs do not re-read big inputs."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
    return cache[key]


class HashCache:
    """sha256 of files, remembered across runs in a JSON file keyed by (path, size, mtime)."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self.cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc) -> None:
        write_json(self.cache_file, self.cache)

    def sha256(self, path: Path) -> str:
        return file_sha256(path, self.cache)


def hash_inputs(units: list[WorkUnit], hashes: HashCache) -> dict[str, dict]:
    inputs = {}
    for unit in units:
        if unit.path not in inputs:
            path = Path(unit.path)
            inputs[unit.path] = {"source": unit.source, "bytes": path.stat().st_size, "sha256": hashes.sha256(path)}
    return inputs


def hash_tree(root: Path, hashes: HashCache) -> dict[str, str]:
    """sha256 of every file under ``root`` (e.g. the evaluation sets decontamination reads)."""
    return (
        {str(p.relative_to(root)): hashes.sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
        if root.is_dir()
        else {}
    )


def fingerprint(*parts: object) -> str:
    """Short stable hash of JSON-serializable parts (configs, unit lists, input hashes)."""
    blob = json.dumps(
        parts, sort_keys=True, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
