"""Turn the configured sources into work units: one task per file, several for big JSONL and Parquet files.

A big JSONL file is read by several tasks that each scan it and keep every parts-th line (a gzip stream
cannot be entered midway); a big Parquet file by several tasks that each read a contiguous share of its
row groups (no scanning: a task reads only its own). An ``arrow`` source's folder (``save_to_disk``)
gives a task per data file.

The plan is deterministic (sorted globs), so the same config always gives the same task ranks;
that is what lets datatrove skip completed tasks on a re-run.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path

from medfoundry import tables
from medfoundry.corpus.config import CorpusConfig, SourceConfig
from medfoundry.errors import ConfigError, InputError

LINE_BASED = {"jsonl"}
_GZ_RATIO = 4  # typical text compression ratio, to estimate the size of a .gz file's content
MAX_PARTS = 8  # every part scans the whole file (a gzip stream cannot be entered midway): more only adds scanning


@dataclass(frozen=True)
class WorkUnit:
    """One task: a file (or one of ``parts`` interleaved line subsets of it, or row group ranges of a Parquet file).

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
        hits = [Path(h) for h in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
        if source.kind == "arrow":
            matched = [f for h in hits if h.is_file() or tables.is_saved_dataset(h) for f in _arrow_files(source, h)]
        else:
            matched = [h for h in hits if h.is_file()]
        if not matched:
            what = "no file or save_to_disk folder" if source.kind == "arrow" else "no file"
            raise ConfigError(f"sources[{source.name}].paths: {pattern!r} matches {what}")
        files.extend(matched)
    return list(dict.fromkeys(files))


def _arrow_files(source: SourceConfig, path: Path) -> list[Path]:
    try:
        return tables.table_files(path, source.split)
    except InputError as exc:
        raise ConfigError(f"sources[{source.name}].paths: {exc}") from None


def _parts_for(path: Path, kind: str, split_mb: float) -> int:
    if kind == "parquet":
        try:
            groups = len(tables.row_groups(path))
        except InputError:  # reported by the task reading it (strict: an error, lenient: a skip)
            return 1
        return max(1, min(groups, math.ceil(path.stat().st_size / (split_mb * 2**20))))
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
