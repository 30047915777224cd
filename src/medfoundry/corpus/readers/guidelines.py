"""Reader for clinical practice guidelines in Meditron's ``epfl-llm/guidelines`` JSONL schema.

One JSON object per line: ``id, source, title, clean_text, raw_text, url, overview`` (``.jsonl`` or
``.jsonl.gz``). Lines are read as bytes and decoded one at a time, so a line that is not valid UTF-8
is reported with its number instead of failing the whole file.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from medfoundry.corpus.readers.base import ReadContext, Record
from medfoundry.io import open_binary


def read_guidelines(path: Path, ctx: ReadContext) -> Iterator[Record]:
    """Yield one record per guideline: ``# title`` then the clean text (raw text when it is empty)."""
    lineno = 0
    seen_content = False
    with open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    seen_content = True
                    record = _parse_line(raw, lineno, ctx)
                    if record is not None:
                        yield record
        except (EOFError, OSError, zlib.error) as err:  # truncated or corrupt gzip stream
            ctx.skip(f"truncated or corrupt gzip data: {err}", lineno + 1)
            return
    if not seen_content:
        ctx.skip("empty file")


def _parse_line(raw: bytes, lineno: int, ctx: ReadContext) -> Record | None:
    try:
        line = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark at the start of the file
    except UnicodeDecodeError:
        ctx.skip("invalid UTF-8", lineno)
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        ctx.skip(f"not valid JSON: {err}", lineno)
        return None
    if not isinstance(obj, dict):
        ctx.skip("not a JSON object", lineno)
        return None
    if obj.get("id") in (None, ""):
        ctx.skip("missing field 'id'", lineno)
        return None
    if "clean_text" not in obj and "raw_text" not in obj:
        ctx.skip("missing field 'clean_text' (or 'raw_text')", lineno)
        return None
    body = _str(obj.get("clean_text")) or _str(obj.get("raw_text"))
    if not body:
        ctx.skip("guideline without text", lineno)
        return None
    title = _str(obj.get("title"))
    meta = {
        "publisher": _str(obj.get("source")) or None,
        "title": title or None,
        "url": _str(obj.get("url")) or None,
        "overview": _str(obj.get("overview")) or None,
    }
    text = f"# {title}\n\n{body}" if title else body
    return Record(native_id=str(obj["id"]), text=text, meta=meta, line=lineno)


def _str(value: Any) -> str:
    """A stripped string field; null and non-string values count as empty."""
    return value.strip() if isinstance(value, str) else ""
