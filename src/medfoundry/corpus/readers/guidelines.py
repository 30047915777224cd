"""Reader for clinical practice guidelines in Meditron's ``epfl-llm/guidelines`` JSONL schema.

One JSON object per line: ``id, source, title, clean_text, raw_text, url, overview`` (``.jsonl`` or
``.jsonl.gz``), read with the generic JSONL reader's line handling and error reporting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfoundry.corpus.readers.base import ReadContext, Record
from medfoundry.corpus.readers.jsonl import decode_object, iter_lines


def read_guidelines(path: Path, ctx: ReadContext) -> Iterator[Record]:
    """Yield one record per guideline: ``# title`` then the clean text (raw text when it is empty)."""
    for lineno, raw in iter_lines(path, ctx):
        obj = decode_object(raw, lineno, ctx)
        record = _record(obj, lineno, ctx) if obj is not None else None
        if record is not None:
            yield record


def _record(obj: dict, lineno: int, ctx: ReadContext) -> Record | None:
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
