"""Columnar inputs: Parquet files and folders written by ``datasets``' ``save_to_disk``, read as a stream.

Both are read with pyarrow alone (the ``datasets`` extra), batch by batch and only the columns asked for,
so memory holds one record batch (a Parquet file: of one row group) whatever the file's size. A
``save_to_disk`` folder holds ``state.json`` and the ``data-*.arrow`` files it lists (Arrow IPC streams);
a ``DatasetDict`` folder holds ``dataset_dict.json`` and one such folder per split, of which the caller
names one. Rows are numbered from 1 in each file: in messages a row number stands where a JSONL file
has a line number.
"""

from __future__ import annotations

import datetime
import decimal
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry import limits
from medfoundry.errors import InputError
from medfoundry.extras import require

PARQUET_SUFFIX = ".parquet"
BATCH_ROWS = 1024  # rows per record batch read from a Parquet file


def _pa(feature: str = "reading Parquet and Arrow files"):
    return require("pyarrow", feature)


def _pq():
    return require("pyarrow.parquet", "reading Parquet files")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_table(path: Path) -> bool:
    """A Parquet file or a ``save_to_disk`` folder (or one of its ``.arrow`` files)."""
    return path.name.endswith(PARQUET_SUFFIX) or path.name.endswith(".arrow") or is_saved_dataset(path)


def saved_dataset_files(folder: Path, split: str | None) -> list[Path]:
    """The ``data-*.arrow`` files of a ``save_to_disk`` folder, in the dataset's row order; ``split`` names the
    split of a ``DatasetDict`` folder (required there, refused for a single ``Dataset``)."""
    splits_file = folder / "dataset_dict.json"
    if splits_file.is_file():
        splits = _json(splits_file).get("splits", [])
        if split is None or split not in splits:
            wanted = "no split is set" if split is None else f"it has no split {split!r}"
            raise InputError(
                str(folder), f"a DatasetDict with splits {', '.join(splits)}, and {wanted}: set split: to one of them"
            )
        folder = folder / split
    elif split is not None:
        raise InputError(str(folder), f"split: {split} is set, but this is a single Dataset (no dataset_dict.json)")
    state = folder / "state.json"
    if not state.is_file():
        raise InputError(str(folder), "not a folder written by datasets' save_to_disk (no state.json)")
    names = [entry.get("filename") for entry in _json(state).get("_data_files", [])]
    if not names or not all(isinstance(n, str) and "/" not in n for n in names):
        raise InputError(str(state), "lists no data files (_data_files): save the dataset again")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InputError(str(folder / missing[0]), "missing (listed in state.json): the saved dataset is incomplete")
    return [folder / n for n in names]


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(str(path), f"unreadable ({exc})") from None
    if not isinstance(value, dict):
        raise InputError(str(path), "expected a JSON object")
    return value


def table_files(path: Path, split: str | None = None) -> list[Path]:
    """The files of one input: a ``save_to_disk`` folder's data files, else the file itself."""
    return saved_dataset_files(path, split) if path.is_dir() else [path]


def row_groups(path: Path) -> list[int]:
    """Rows of each row group of a Parquet file (read from its footer only)."""
    try:
        meta = _pq().ParquetFile(path).metadata
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(str(path), f"not a readable Parquet file ({exc})") from None
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def schema_of(path: Path):
    """The Arrow schema of a Parquet file or an Arrow stream (read from its footer or its head only)."""
    source = _open(path)
    return source.schema_arrow if path.name.endswith(PARQUET_SUFFIX) else source.schema


def _open(path: Path):
    """A Parquet file or an Arrow stream reader, or an :class:`InputError` saying why it is neither."""
    pa = _pa()
    try:
        if path.name.endswith(PARQUET_SUFFIX):
            return _pq().ParquetFile(path)
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except (OSError, ValueError) as exc:
        kind = "Parquet file" if path.name.endswith(PARQUET_SUFFIX) else "Arrow stream (a save_to_disk data file)"
        raise InputError(str(path), f"not a readable {kind} ({exc})") from None


def iter_batches(path: Path, columns: list[str], groups: range | None = None) -> Iterator[tuple[int, Any]]:
    """``(first row number, record batch)`` of ``columns`` (those the file has); for a Parquet file only the
    row groups ``groups`` (default: all), numbered as in the whole file."""
    source = _open(path)
    names = (source.schema_arrow if path.name.endswith(PARQUET_SUFFIX) else source.schema).names
    present = [c for c in dict.fromkeys(columns) if c in names]
    try:
        if not path.name.endswith(PARQUET_SUFFIX):
            yield from _numbered((b.select(present) for b in source), 1)
            return
        sizes = [source.metadata.row_group(i).num_rows for i in range(source.metadata.num_row_groups)]
        groups = range(len(sizes)) if groups is None else groups
        if len(groups):
            first = 1 + sum(sizes[: groups[0]])
            yield from _numbered(source.iter_batches(BATCH_ROWS, row_groups=list(groups), columns=present), first)
    except (OSError, ValueError) as exc:
        raise InputError(str(path), f"unreadable ({exc}): the file is truncated or corrupt") from None


def _numbered(batches, first: int) -> Iterator[tuple[int, Any]]:
    for batch in batches:
        yield first, batch
        first += batch.num_rows


def text_bytes(batch, columns: list[str]):
    """UTF-8 bytes of ``columns`` per row of ``batch`` (numpy), to refuse over-limit rows before converting
    them to Python objects; string columns only (others count 0)."""
    pa, pc = _pa(), require("pyarrow.compute", "reading Parquet and Arrow files")
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for name in columns:
        if name in batch.schema.names:
            column = batch.column(name)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                total += pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    return total


def over_limit(size: int) -> str:
    return (
        f"row holds {limits.mib(int(size))} of text, over {limits.mib(limits.MAX_ROW_BYTES)} "
        "(medfoundry.limits.MAX_ROW_BYTES): refused"
    )


def plain(value: Any) -> Any:
    """A value of an Arrow row as JSON can hold it (dates as ISO text, decimals as text); a ``ValueError``
    for binary data, which it cannot."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | datetime.timedelta):
        return str(value)
    if isinstance(value, bytes | bytearray):
        raise ValueError("binary data")
    return value
