"""Parquet files and ``datasets`` ``save_to_disk`` data files, mapped onto documents as JSONL records are.

The :class:`FieldMap` means what it means for JSONL, and bad rows are skipped (lenient) or refused
(strict) by the same rules, a row number standing for the line number. Arrow cannot tell a missing
field from a null one, so a row whose text fields are all null is skipped as JSONL skips a record that
has none of them. A text column that is not a string column, or a file that has none of the text
columns, is refused whole (every row would be). Rows are read in batches, only the mapped columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medfoundry import limits, tables
from medfoundry.corpus.config import FieldMap
from medfoundry.corpus.readers.base import ReadContext, Record
from medfoundry.corpus.readers.jsonl import text_of
from medfoundry.errors import InputError
from medfoundry.extras import require


def groups_of(sizes: list[int], part: int, parts: int) -> range:
    """Row groups read by task ``part`` of ``parts``: a contiguous share of the file's groups."""
    count = len(sizes)
    return range(part * count // parts, (part + 1) * count // parts)


def read_table(path: Path, ctx: ReadContext, fields: FieldMap, part: int = 0, parts: int = 1) -> Iterator[Record]:
    """Records of a Parquet file (task ``part`` of ``parts`` reads its share of the row groups) or of one
    ``data-*.arrow`` file of a ``save_to_disk`` folder."""
    try:
        groups = groups_of(tables.row_groups(path), part, parts) if path.name.endswith(".parquet") else None
        problem = _schema_problem(path, fields)
        if problem:
            if part == 0:
                ctx.skip(problem)
            return
    except InputError as exc:  # an unreadable file
        ctx.skip(exc.message, exc.line)
        return
    wanted = [*fields.text, *(n for n in (fields.id, fields.pmid, fields.doi) if n), *fields.meta]
    batches = tables.iter_batches(path, wanted, groups)
    while True:
        try:
            item = next(batches, None)
        except InputError as exc:  # truncated or corrupt midway: nothing after it can be trusted
            ctx.skip(exc.message, exc.line)
            return
        if item is None:
            return
        yield from _records(item[1], item[0], ctx, fields)


def _schema_problem(path: Path, fields: FieldMap) -> str | None:
    """Why no row of the file can be read as a document, or None."""
    pa = require("pyarrow", "reading Parquet and Arrow files")
    schema = tables.schema_of(path)
    present = [name for name in fields.text if name in schema.names]
    if not present:
        return f"none of the text fields {fields.text} is a column (columns: {schema.names[:10]})"
    for name in present:
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            return f"text field {name!r} is a column of {kind}, not of strings"
    return None


def _records(batch, first: int, ctx: ReadContext, fields: FieldMap) -> Iterator[Record]:
    sizes = tables.text_bytes(batch, fields.text)
    for offset, row in enumerate(batch.to_pylist()):
        line = first + offset
        if sizes[offset] > limits.MAX_ROW_BYTES:
            ctx.skip(tables.over_limit(sizes[offset]), line)
            continue
        if all(row.get(name) is None for name in fields.text):
            ctx.skip(f"none of the text fields {fields.text} has a value (all null)", line)
            continue
        record = _record(row, line, ctx, fields)
        if record is not None:
            yield record


def _record(row: dict, line: int, ctx: ReadContext, fields: FieldMap) -> Record | None:
    try:
        meta = {name: tables.plain(row.get(name)) for name in fields.meta}
    except ValueError as exc:
        ctx.skip(f"a meta field holds {exc}, which a document's metadata (JSON) cannot", line)
        return None
    for key in ("pmid", "doi"):
        name = getattr(fields, key)
        if name and row.get(name) not in (None, ""):
            meta[key] = str(row[name])
    native_id = row.get(fields.id) if fields.id else None
    return Record(str(native_id) if native_id not in (None, "") else None, text_of(row, fields), meta, line)
