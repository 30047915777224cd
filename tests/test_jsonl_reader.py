"""Generic JSONL and plain-text readers: real shared files, splitting, and every kind of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import shared
from medfoundry.corpus.config import FieldMap
from medfoundry.corpus.readers.base import ReadContext, Record
from medfoundry.corpus.readers.jsonl import read_jsonl, read_text
from medfoundry.errors import InputError

ABSTRACT_FIELDS = FieldMap(text=["title", "abstract"], id="pmid", pmid="pmid", meta=["source", "license"])
REPLAY_FIELDS = FieldMap(text=["text"], meta=["source", "license"])
TEXT = FieldMap(text=["text"])


def read(path: Path, fields: FieldMap = TEXT, strict: bool = True, part: int = 0, parts: int = 1):
    ctx = ReadContext(path, strict=strict)
    return list(read_jsonl(path, ctx, fields, part, parts)), ctx


def write_lines(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def doc(text: str, **extra) -> bytes:
    return json.dumps({"text": text, **extra}).encode()


# ---------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def abstracts() -> list[Record]:
    path = shared("corpus/pubmed_abstracts.jsonl.gz")
    records, ctx = read(path, ABSTRACT_FIELDS)
    assert ctx.skips == []
    return records


@pytest.fixture(scope="module")
def abstracts_raw() -> list[dict]:
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_pubmed_abstracts_count_and_ids(abstracts, abstracts_raw):
    assert len(abstracts) == 26_925 == len(abstracts_raw)
    assert [r.line for r in abstracts] == list(range(1, 26_926))
    for rec, obj in zip(abstracts, abstracts_raw):
        if obj["pmid"] is None:
            assert rec.native_id is None and "pmid" not in rec.meta
        else:
            assert rec.native_id == str(obj["pmid"])
            assert rec.meta["pmid"] == str(obj["pmid"]) and isinstance(rec.meta["pmid"], str)
        assert rec.meta["source"] == obj["source"] and rec.meta["license"] == obj["license"]
    # both kinds are really present in the file
    assert sum(r.native_id is None for r in abstracts) == 11_833
    assert sum(r.native_id is not None for r in abstracts) == 15_092


def test_pubmed_abstracts_text_layout(abstracts, abstracts_raw):
    with_title = next(i for i, o in enumerate(abstracts_raw) if o["title"] and o["abstract"] and o["pmid"])
    obj, rec = abstracts_raw[with_title], abstracts[with_title]
    assert rec.text == f"{obj['title'].strip()}\n\n{obj['abstract'].strip()}"
    assert rec.text.startswith(obj["title"].strip() + "\n\n")

    null_title = next(i for i, o in enumerate(abstracts_raw) if o["title"] is None)
    obj, rec = abstracts_raw[null_title], abstracts[null_title]
    assert rec.text == obj["abstract"].strip()
    assert not rec.text.startswith("None") and not rec.text.startswith("\n")
    assert all(r.text for r in abstracts)


def test_general_replay():
    path = shared("corpus/general_replay.jsonl.gz")
    records, ctx = read(path, REPLAY_FIELDS)
    assert len(records) == 624 and ctx.skips == []
    assert all(r.native_id is None and set(r.meta) == {"source", "license"} for r in records)
    assert records[0].text.startswith("PRESIDENT HARRY S. TRUMAN'S ADDRESS")


def test_parts_partition_the_file():
    path = shared("corpus/general_replay.jsonl.gz")
    whole_records, _ = read(path, REPLAY_FIELDS)
    whole = {(r.line, r.text, tuple(r.meta.items())) for r in whole_records}
    assert len(whole) == 624
    pieces = []
    for part in range(3):
        records, ctx = read(path, REPLAY_FIELDS, part=part, parts=3)
        assert ctx.skips == [] and records
        assert all((r.line - 1) % 3 == part for r in records)
        pieces.append({(r.line, r.text, tuple(r.meta.items())) for r in records})
    assert not pieces[0] & pieces[1] and not pieces[0] & pieces[2] and not pieces[1] & pieces[2]
    assert pieces[0] | pieces[1] | pieces[2] == whole
    assert sum(map(len, pieces)) == len(whole_records)


# ---------------------------------------------------------------- bad input, strict vs lenient


def _strict_error(path: Path, fields: FieldMap = TEXT) -> InputError:
    with pytest.raises(InputError) as info:
        read(path, fields, strict=True)
    return info.value


def test_not_json(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [doc("one"), b'{"text": "two"', doc("three")])
    err = _strict_error(path)
    assert "bad.jsonl:2:" in str(err) and err.line == 2 and "not valid JSON" in str(err)

    records, ctx = read(path, strict=False)
    assert [(r.text, r.line) for r in records] == [("one", 1), ("three", 3)]
    assert len(ctx.skips) == 1
    assert ctx.skips[0].line == 2 and "JSON" in ctx.skips[0].reason and ctx.skips[0].path == str(path)


def test_invalid_utf8(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [doc("ok"), b'{"text": "caf\xe9"}', doc("fine")])
    err = _strict_error(path)
    assert "latin1.jsonl:2:" in str(err) and "invalid UTF-8" in str(err)

    records, ctx = read(path, strict=False)
    assert [r.text for r in records] == ["ok", "fine"]
    assert [(s.line, s.reason) for s in ctx.skips] == [(2, "invalid UTF-8 at byte 13")]


def test_array_instead_of_object(tmp_path):
    path = write_lines(tmp_path / "arr.jsonl", [b'["text", "x"]', doc("kept")])
    err = _strict_error(path)
    assert "arr.jsonl:1:" in str(err) and "expected a JSON object, got list" in str(err)

    records, ctx = read(path, strict=False)
    assert [r.text for r in records] == ["kept"]
    assert [(s.line, s.reason) for s in ctx.skips] == [(1, "expected a JSON object, got list")]


def test_record_without_text_fields(tmp_path):
    fields = FieldMap(text=["title", "abstract"])
    path = write_lines(
        tmp_path / "nofields.jsonl",
        [b'{"title": "T", "abstract": "A"}', b'{"body": "x", "id": 3}', b'{"abstract": "only abstract"}'],
    )
    err = _strict_error(path, fields)
    assert "nofields.jsonl:2:" in str(err) and "none of the text fields ['title', 'abstract']" in str(err)
    assert "['body', 'id']" in str(err)  # the keys that are there, to spot a wrong field map

    records, ctx = read(path, fields, strict=False)
    assert [r.text for r in records] == ["T\n\nA", "only abstract"]
    assert [s.line for s in ctx.skips] == [2]


@pytest.mark.parametrize(
    "name, content",
    [("empty.jsonl", b""), ("empty.jsonl.gz", gzip.compress(b"", mtime=0)), ("blank.jsonl", b"\n  \n\r\n")],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    err = _strict_error(path)
    assert str(err) == f"{path}: empty file" and err.line is None

    records, ctx = read(path, strict=False)
    assert records == [] and [(s.line, s.reason) for s in ctx.skips] == [(None, "empty file")]
    # only part 0 reports it, so a split file is not reported several times
    _, ctx1 = read(path, strict=False, part=1, parts=2)
    assert ctx1.skips == []


def test_truncated_gzip(tmp_path):
    texts = [f"document {i} " + "word " * (i % 40) for i in range(4000)]
    full = gzip.compress(b"".join(doc(t) + b"\n" for t in texts))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])

    err = _strict_error(path)
    assert "cut.jsonl.gz:" in str(err) and "truncated or corrupt" in str(err)

    records, ctx = read(path, strict=False)
    assert 0 < len(records) < len(texts)
    # what is kept is an intact prefix of the file: no half line, nothing invented
    assert [r.text for r in records] == [t.strip() for t in texts[: len(records)]]
    assert [r.line for r in records] == list(range(1, len(records) + 1))
    assert len(ctx.skips) == 1
    assert ctx.skips[0].line == len(records) + 1 and "truncated or corrupt gzip" in ctx.skips[0].reason

    part0, ctx0 = read(path, strict=False, part=0, parts=2)
    part1, ctx1 = read(path, strict=False, part=1, parts=2)
    assert len(ctx0.skips) == 1 and ctx1.skips == []
    assert sorted(r.line for r in part0 + part1) == [r.line for r in records]


def test_blank_lines_ignored(tmp_path):
    path = write_lines(tmp_path / "blanks.jsonl.gz", [b"", doc("a"), b"   ", b"\t", doc("b"), b"\r", b""])
    records, ctx = read(path, strict=True)
    assert [(r.text, r.line) for r in records] == [("a", 2), ("b", 5)]
    records, ctx = read(path, strict=False)
    assert len(records) == 2 and ctx.skips == []


def test_crlf_and_bom(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + doc("first") + b"\r\n" + doc("second") + b"\r\n")
    records, _ = read(path, strict=True)
    assert [r.text for r in records] == ["first", "second"]


# ---------------------------------------------------------------- field mapping


def test_pile_style(tmp_path):
    meta = {"pile_set_name": "PubMed Abstracts", "pmid": 123}
    path = write_lines(tmp_path / "pile.jsonl", [json.dumps({"text": "  Body text.  ", "meta": meta}).encode()])
    (rec,), ctx = read(path, FieldMap(text=["text"], meta=["meta"]))
    assert ctx.skips == []
    assert rec == Record(None, "Body text.", {"meta": meta}, 1)


def test_id_pmid_and_null_fields(tmp_path):
    fields = FieldMap(text=["title", "abstract"], id="pmid", pmid="pmid", meta=["journal"])
    path = write_lines(
        tmp_path / "ids.jsonl",
        [
            b'{"pmid": 31452104, "title": "Title.", "abstract": "Abstract.", "journal": "J"}',
            b'{"pmid": "", "title": "", "abstract": "Only abstract."}',
            b'{"pmid": null, "title": null, "abstract": "Null title."}',
        ],
    )
    records, _ = read(path, fields)
    assert records[0] == Record("31452104", "Title.\n\nAbstract.", {"journal": "J", "pmid": "31452104"}, 1)
    assert records[1] == Record(None, "Only abstract.", {"journal": None}, 2)
    assert records[2] == Record(None, "Null title.", {"journal": None}, 3)


# ---------------------------------------------------------------- plain text


def test_read_text(tmp_path):
    path = tmp_path / "note.txt"
    path.write_text("Line one.\nLine two: café.\n", encoding="utf-8")
    ctx = ReadContext(path)
    assert list(read_text(path, ctx)) == [Record("note.txt", "Line one.\nLine two: café.\n", {"file": "note.txt"}, 1)]

    gz = tmp_path / "note2.txt.gz"
    gz.write_bytes(gzip.compress(b"Compressed text."))
    (rec,) = read_text(gz, ReadContext(gz))
    assert rec.native_id == "note2.txt.gz" and rec.text == "Compressed text."


def test_read_text_empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n")
    with pytest.raises(InputError, match="empty file"):
        list(read_text(path, ReadContext(path)))
    ctx = ReadContext(path, strict=False)
    assert list(read_text(path, ctx)) == [] and [s.reason for s in ctx.skips] == ["empty file"]


def test_read_text_invalid_utf8(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"first line\nsecond line\nthird caf\xe9\n")
    with pytest.raises(InputError) as info:
        list(read_text(path, ReadContext(path)))
    assert "bad.txt:3:" in str(info.value) and "invalid UTF-8 at byte 32" in str(info.value)
    ctx = ReadContext(path, strict=False)
    assert list(read_text(path, ctx)) == [] and [s.line for s in ctx.skips] == [3]
