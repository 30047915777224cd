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


@dataclass(frozen=True)
class WorkUnit:
    source: str
    kind: str
    path: str
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
    return max(1, math.ceil(size / (split_mb * 2**20)))


def plan_units(cfg: CorpusConfig) -> list[WorkUnit]:
    units = []
    for source in cfg.sources:
        for path in expand_paths(source):
            parts = _parts_for(path, source.kind, cfg.split_mb)
            units.extend(WorkUnit(source.name, source.kind, str(path), p, parts) for p in range(parts))
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


def hash_inputs(units: list[WorkUnit], cache_file: Path) -> dict[str, dict]:
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    inputs = {}
    for unit in units:
        if unit.path not in inputs:
            path = Path(unit.path)
            inputs[unit.path] = {"source": unit.source, "bytes": path.stat().st_size, "sha256": file_sha256(path, cache)}
    write_json(cache_file, cache)
    return inputs


def fingerprint(*parts: object) -> str:
    """Short stable hash of JSON-serializable parts (configs, unit lists, input hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
