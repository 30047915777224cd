"""Clinical-guideline reader (Meditron ``epfl-llm/guidelines`` JSONL schema).

No clinical-guideline corpus is available under an open licence (see ../shared/data/README.md), so
``fixtures/guidelines/guidelines_sample.jsonl`` holds six guideline records written for this project
in that schema. The bad-input files are built in ``tmp_path`` by the tests themselves.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from conftest import FIXTURES
from medfoundry.corpus.readers.base import ReadContext
from medfoundry.corpus.readers.guidelines import read_guidelines
from medfoundry.errors import InputError

SAMPLE = FIXTURES / "guidelines" / "guidelines_sample.jsonl"


def _read(path: Path, strict: bool = True):
    ctx = ReadContext(path, strict=strict)
    return list(read_guidelines(path, ctx)), ctx


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _guideline(**fields) -> bytes:
    """One JSONL line; a field given as ``...`` is left out."""
    record = {"id": "g1", "source": "nice", "title": "A title", "clean_text": "Clean text.",
              "raw_text": "<p>Raw text.</p>", "url": "https://example.org/g1", "overview": None}  # fmt: skip
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


def test_sample_fixture():
    records, ctx = _read(SAMPLE)
    assert ctx.skips == []
    assert [r.meta["publisher"] for r in records] == ["who", "cdc", "nice", "cco", "wikidoc", "aafp"]
    assert [r.line for r in records] == [1, 2, 3, 4, 5, 6]
    nice = records[2]
    title = "Hypertension in adults: diagnosis and management"
    assert nice.text.startswith(f"# {title}\n\n1.1 Measuring blood pressure\n\n")
    assert nice.meta["title"] == title
    assert nice.meta["url"] == "https://www.nice.org.uk/guidance/ng136"
    assert nice.meta["overview"].startswith("Covers identifying and treating primary hypertension")
    assert records[1].meta["overview"] is None
    first = json.loads(SAMPLE.read_text(encoding="utf-8").splitlines()[0])
    assert records[0].native_id == first["id"]
    for record in records:  # long enough to survive the 200-character / 20-word length filters
        assert len(record.text) > 1500 and len(record.text.split()) > 250
        assert "<p>" not in record.text  # clean_text, not raw_text


def test_gzip_input_gives_same_records(tmp_path):
    gz = tmp_path / "guidelines.jsonl.gz"
    gz.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    assert _read(gz)[0] == _read(SAMPLE)[0]


def test_raw_text_fallback_and_missing_title(tmp_path):
    path = _write_lines(tmp_path / "g.jsonl", [
        _guideline(clean_text="", title=None),
        _guideline(id=7, clean_text=None, title="  "),
    ])  # fmt: skip
    records, _ = _read(path)
    assert [r.text for r in records] == ["<p>Raw text.</p>", "<p>Raw text.</p>"]
    assert [r.native_id for r in records] == ["g1", "7"]
    assert records[0].meta["title"] is None


def test_blank_lines_are_ignored(tmp_path):
    path = _write_lines(tmp_path / "g.jsonl", [b"", _guideline(), b"   ", b"", _guideline(id="g2")])
    records, ctx = _read(path, strict=True)
    assert [(r.native_id, r.line) for r in records] == [("g1", 2), ("g2", 5)]
    assert ctx.skips == []


BAD_LINES = [
    (b"\xff\xfe not utf-8", "invalid UTF-8"),
    (b'{"id": "g9", "clean_text": ', "not valid JSON: "),
    (b'["a", "list"]', "expected a JSON object"),
    (_guideline(id=...), "missing field 'id'"),
    (_guideline(clean_text=..., raw_text=...), "missing field 'clean_text'"),
    (_guideline(clean_text=" ", raw_text=""), "guideline without text"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_strict_raises_with_file_and_line(tmp_path, bad, reason):
    path = _write_lines(tmp_path / "bad.jsonl", [_guideline(), bad, _guideline(id="g3")])
    with pytest.raises(InputError, match=reason) as err:
        _read(path, strict=True)
    assert err.value.line == 2
    assert str(err.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("bad, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_lenient_skips_and_continues(tmp_path, bad, reason):
    path = _write_lines(tmp_path / "bad.jsonl", [_guideline(), bad, _guideline(id="g3")])
    records, ctx = _read(path, strict=False)
    assert [r.native_id for r in records] == ["g1", "g3"]
    assert len(ctx.skips) == 1
    assert ctx.skips[0].line == 2 and ctx.skips[0].reason.startswith(reason)


def test_truncated_gzip_skips_and_stops(tmp_path):
    lines = [_guideline(id=f"g{i}", clean_text=os.urandom(3000).hex()) for i in range(50)]  # incompressible
    data = gzip.compress(b"\n".join(lines) + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    records, ctx = _read(path, strict=False)
    assert 0 < len(records) < 50
    assert len(ctx.skips) == 1 and "gzip" in ctx.skips[0].reason
    assert ctx.skips[0].line == len(records) + 1
    with pytest.raises(InputError, match="gzip"):
        _read(path, strict=True)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match="empty file"):
        _read(path, strict=True)
    records, ctx = _read(path, strict=False)
    assert records == [] and [s.reason for s in ctx.skips] == ["empty file"]
