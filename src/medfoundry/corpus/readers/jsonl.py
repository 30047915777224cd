"""Generic JSONL (any schema, mapped by :class:`FieldMap`; Pile-style ``{"text","meta"}``) and plain text."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from medfoundry import limits
from medfoundry.corpus.config import FieldMap
from medfoundry.corpus.readers.base import ReadContext, Record
from medfoundry.io import line_too_long, lone_surrogate, may_hold_surrogates, open_binary, read_lines

_GZIP_ERRORS = (EOFError, zlib.error, OSError)


def iter_lines(path: Path, ctx: ReadContext, part: int = 0, parts: int = 1) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, bytes)`` of non-blank lines; with ``parts`` > 1 only every parts-th line.

    Several tasks can then share one big file (each decompresses it, which is cheap next to
    parsing). Faults that end the file (truncated gzip) are reported by part 0 only, a line over
    :data:`~medfoundry.limits.MAX_LINE_BYTES` by its part (without reading it whole), and a file with no
    non-blank line by part 0, as empty.
    """
    seen_any = False
    number = 0
    try:
        with open_binary(path) as fh:
            for number, raw in enumerate(read_lines(fh), start=1):
                if raw is not None and not raw.strip():
                    continue
                seen_any = True
                if (number - 1) % parts != part:
                    continue
                if raw is None:
                    ctx.skip(line_too_long(), number)
                else:
                    yield number, raw
    except _GZIP_ERRORS as exc:
        if part == 0:
            ctx.skip(f"truncated or corrupt gzip: line {number + 1} cannot be read ({exc})", number + 1)
        return
    if not seen_any and part == 0:
        ctx.skip("empty file")


def decode_object(raw: bytes, line: int, ctx: ReadContext) -> dict | None:
    """One JSONL line as a dict, or None after reporting why it is not one."""
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark at the start of the file
    except UnicodeDecodeError as exc:
        ctx.skip(f"invalid UTF-8 at byte {exc.start}", line)
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        ctx.skip(f"not valid JSON: {exc.msg} (column {exc.colno})", line)
        return None
    except ValueError as exc:  # an integer of more than 4300 digits
        ctx.skip(f"not valid JSON: {exc}", line)
        return None
    except RecursionError:
        ctx.skip("not valid JSON: nested too deeply", line)
        return None
    surrogate = lone_surrogate(obj) if may_hold_surrogates(text) else None
    if surrogate is not None:  # valid JSON syntax, but no text: it could not be written out as UTF-8
        ctx.skip(f"not valid JSON text: the string escape \\u{ord(surrogate):04x} is a lone UTF-16 surrogate", line)
        return None
    if not isinstance(obj, dict):
        ctx.skip(f"expected a JSON object, got {type(obj).__name__}", line)
        return None
    return obj


def text_of(obj: dict, fields: FieldMap) -> str:
    """The text fields present and non-empty, stripped, joined with a blank line (also for Parquet and Arrow rows)."""
    parts = [obj.get(name) for name in fields.text]
    return "\n\n".join(str(p).strip() for p in parts if p not in (None, "") and str(p).strip())


def read_jsonl(path: Path, ctx: ReadContext, fields: FieldMap, part: int = 0, parts: int = 1) -> Iterator[Record]:
    for line, raw in iter_lines(path, ctx, part, parts):
        obj = decode_object(raw, line, ctx)
        if obj is None:
            continue
        missing = [name for name in fields.text if name not in obj]
        if len(missing) == len(fields.text):
            ctx.skip(f"none of the text fields {fields.text} is present (keys: {sorted(obj)[:10]})", line)
            continue
        native_id = obj.get(fields.id) if fields.id else None
        meta = {name: obj.get(name) for name in fields.meta}
        for key in ("pmid", "doi"):
            name = getattr(fields, key)
            if name and obj.get(name) not in (None, ""):
                meta[key] = str(obj[name])
        yield Record(str(native_id) if native_id not in (None, "") else None, text_of(obj, fields), meta, line)


def read_text(path: Path, ctx: ReadContext) -> Iterator[Record]:
    """One document per plain-text file (``.txt`` or ``.txt.gz``), id = file name; a file over
    :data:`~medfoundry.limits.MAX_TEXT_FILE_BYTES` is skipped, having read no more than that."""
    try:
        with open_binary(path) as fh:
            data = fh.read(limits.MAX_TEXT_FILE_BYTES + 1)
    except _GZIP_ERRORS as exc:
        ctx.skip(f"truncated or corrupt file: {exc}")
        return
    if len(data) > limits.MAX_TEXT_FILE_BYTES:
        ctx.skip(
            f"more than {limits.mib(limits.MAX_TEXT_FILE_BYTES)} of text (decompressed; "
            "medfoundry.limits.MAX_TEXT_FILE_BYTES): too large for one document, refused"
        )
        return
    if not data.strip():
        ctx.skip("empty file")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        ctx.skip(f"invalid UTF-8 at byte {exc.start}", line)
        return
    yield Record(path.name, text, {"file": path.name}, 1)
