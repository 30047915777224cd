"""Input limits (issue 18, items 6 and 9): node bombs, huge lines and files, and files that are not what their
source says are refused (strict: an InputError naming file and line) or skipped and reported (lenient: a recorded
skip, the good entries of the file still read), in bounded memory.

Before the limits, 10⁷ empty elements in a ~200 KB ``.xml.gz`` took a PubMed or JATS reader to 1.7 GB, a 2 GB
line or file was read whole, and an HTML page saved as ``.xml`` was zero documents with no word in the report.
To stay quick, the readers run here (in a child process, to measure its memory) with smaller limits and inputs a
few times over them: what reading adds to the child's memory is then tens of MB, where the unlimited readers
took hundreds (2·10⁶ elements: ~350 MB) or the whole file. ``benchmarks/reliability_report.py --only
node_bomb_pubmed node_bomb_jats huge_line_jsonl`` runs 10⁸ elements and a 2 GB line with the real limits.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from input_bombs import SHAPES, html_page, huge_json_gz, huge_jsonl, huge_line, node_bomb, read_in_child
from medfoundry import limits
from medfoundry.config import validate
from medfoundry.corpus.build import build_corpus
from medfoundry.corpus.config import CorpusConfig
from medfoundry.corpus.readers.base import ReadContext
from medfoundry.corpus.readers.jats import read_jats
from medfoundry.corpus.readers.pubmed_xml import read_pubmed_xml
from medfoundry.errors import InputError
from medfoundry.io import iter_json_lines

pytestmark = pytest.mark.timeout(300)
GROWTH_MB = 100  # what reading may add to the child's memory, here; the real limits keep it under 1 GB
SUFFIX = {"pubmed": "xml", "jats": "nxml"}


def _bounded(result: dict) -> None:
    assert result["growth_mb"] < GROWTH_MB and result["peak_mb"] < 1024, result


@pytest.mark.parametrize("shape", ["entry", "siblings"])
@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_node_bombs_are_skipped_in_bounded_memory(kind, shape, tmp_path):
    path = node_bomb(tmp_path / f"bomb.{SUFFIX[kind]}.gz", kind, shape, 2_000_000)
    result = read_in_child(kind, path, MAX_ENTRY_MARKUP=200_000)
    assert result["ids"] == list(SHAPES[kind][2])  # the good entries before and after the bomb
    ((line, reason),) = result["skips"]
    if shape == "entry":
        assert re.fullmatch(
            r"<(PubmedArticle|article)> entry with more than 200,000 tags, .*MAX_ENTRY_MARKUP.*", reason
        )
    else:
        assert reason.startswith(f"unexpected <a> in <{SHAPES[kind][0]}>, which holds only")
    assert line == 3 and result["error"] == f"{path}:3: {reason}"
    _bounded(result)


def test_a_2gb_line_is_skipped_in_bounded_memory(tmp_path):
    path = huge_jsonl(tmp_path / "huge.jsonl")
    result = read_in_child("jsonl", path)
    assert result["ids"] == ["good one", "good two"]
    reason = "a line of more than 32 MiB (medfoundry.limits.MAX_LINE_BYTES): refused without reading it whole"
    assert result["skips"] == [[2, reason]] and result["error"] == f"{path}:2: {reason}"
    _bounded(result)


def test_strict_jsonl_refuses_a_long_line(tmp_path, monkeypatch):
    """Evaluation and SFT JSONL go through ``io.iter_lines``, which shares the corpus reader's line reading."""
    monkeypatch.setattr(limits, "MAX_LINE_BYTES", 1 << 20)
    path = huge_jsonl(tmp_path / "eval.jsonl", 3 << 20)
    with pytest.raises(InputError, match=re.escape(f"{path}:2: a line of more than 1 MiB")):
        list(iter_json_lines(path))


def test_a_2gb_text_file_is_skipped_in_bounded_memory(tmp_path):
    path = huge_line(tmp_path / "book.txt", 2 << 30, b"One huge line", b"\n")
    result = read_in_child("text", path, MAX_TEXT_FILE_BYTES=1 << 20)
    reason = (
        "more than 1 MiB of text (decompressed; medfoundry.limits.MAX_TEXT_FILE_BYTES): too large for one document, "
        "refused"
    )
    assert result["ids"] == [] and result["skips"] == [[None, reason]] and result["error"] == f"{path}: {reason}"
    _bounded(result)


@pytest.mark.parametrize("name", ["data.json", "data.json.gz"])
def test_a_huge_sft_json_file_is_refused_in_bounded_memory(name, tmp_path):
    if name.endswith(".gz"):
        path = huge_json_gz(tmp_path / name, 3 << 20)
    else:
        path = huge_line(tmp_path / name, 2 << 30, b'[{"instruction": "Say something.", "output": "', b'"}]\n')
    result = read_in_child("sft", path, MAX_JSON_FILE_BYTES=1 << 20)
    assert result["error"] == (
        f"{path}: more than 1 MiB of JSON (decompressed; medfoundry.limits.MAX_JSON_FILE_BYTES): a JSON file is "
        "parsed in memory, so a larger one is refused; write it as JSONL (one record per line, read as a stream) "
        "instead"
    )
    _bounded(result)


# --- files that are not what their source says (item 9) ---------------------------------------------------


@pytest.mark.parametrize("well_formed", [True, False], ids=["xhtml", "html"])
@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_a_file_whose_root_is_not_the_format_is_named(kind, well_formed, tmp_path):
    path = html_page(tmp_path / f"page.{SUFFIX[kind]}")
    if well_formed:
        path.write_text(path.read_text().replace('<meta charset="utf-8">', "").replace("<!DOCTYPE html>", ""))
    reader = read_pubmed_xml if kind == "pubmed" else read_jats
    expected = "<PubmedArticleSet> or <MedlineCitationSet> or <PubmedBookArticleSet>"
    expected = f"not a PubMed file: its root element is <html>, not {expected}"
    if kind == "jats":
        expected = "not a JATS file: its root element is <html>, not <pmc-articleset>"
    ctx = ReadContext(path, strict=False)
    assert list(reader(path, ctx)) == [] and [(s.line, s.reason) for s in ctx.skips] == [(2, expected)]
    with pytest.raises(InputError, match=re.escape(f"{path}:2: {expected}")):
        list(reader(path, ReadContext(path, strict=True)))


@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_a_lone_entry_as_the_root_still_reads(kind, tmp_path):
    _, entry, (first, _) = SHAPES[kind]
    path = tmp_path / f"one.{SUFFIX[kind]}"
    path.write_text(entry(first))
    reader = read_pubmed_xml if kind == "pubmed" else read_jats
    ctx = ReadContext(path, strict=True)
    assert [r.native_id for r in reader(path, ctx)] == [first]


def test_corpus_build_names_each_refused_file_in_the_report(tmp_path, monkeypatch):
    """Lenient `corpus build`: a wrong-root PubMed and JATS file, node bombs and a huge line are each a skip in
    ``dropped.jsonl.gz`` and in the report's "Skipped input", and no good document is lost."""
    monkeypatch.setattr(limits, "MAX_ENTRY_MARKUP", 100_000)  # the extract runs in this process (workers: 1)
    monkeypatch.setattr(limits, "MAX_LINE_BYTES", 1 << 20)
    root = tmp_path / "in"
    for folder in ("pubmed", "pmc", "jsonl"):
        (root / folder).mkdir(parents=True)
    html_page(root / "pubmed" / "page.xml")
    html_page(root / "pmc" / "page.nxml")
    node_bomb(root / "pubmed" / "bomb.xml.gz", "pubmed", "siblings", 200_000)
    node_bomb(root / "pmc" / "bomb.nxml.gz", "jats", "entry", 200_000)
    huge_jsonl(root / "jsonl" / "huge.jsonl", 4 << 20)
    cfg = validate(
        CorpusConfig,
        {
            "output_dir": str(tmp_path / "corpus"),
            "workers": 1,
            "strict": False,
            "sources": [
                {"name": "pubmed", "kind": "pubmed_xml", "paths": [str(root / "pubmed" / "*")]},
                {"name": "papers", "kind": "jats", "paths": [str(root / "pmc" / "*")]},
                {"name": "web", "kind": "jsonl", "paths": [str(root / "jsonl" / "*")]},
            ],
            "decontam": {"enabled": False},
            "split": {"val_fraction": 0.0},
            "clean": {"min_chars": 5, "min_words": 2},
        },
    )
    manifest = build_corpus(cfg)
    assert manifest.counts["documents_train"] == 6  # PMIDs 1 and 3, PMC1 and PMC3, the two good lines
    with gzip.open(tmp_path / "corpus" / "dropped.jsonl.gz", "rt") as fh:
        drops = [d for d in map(json.loads, fh) if d["stage"] == "read"]
    skipped = {Path(d["detail"].split(":")[0]).name: d["detail"] for d in drops}
    assert sorted(skipped) == ["bomb.nxml.gz", "bomb.xml.gz", "huge.jsonl", "page.nxml", "page.xml"]
    assert "not a PubMed file: its root element is <html>" in skipped["page.xml"]
    assert "not a JATS file: its root element is <html>" in skipped["page.nxml"]
    report = (tmp_path / "corpus" / "report.md").read_text()
    skipped_section = report.split("## Skipped input (lenient mode)")[1].split("\n## ")[0]
    for name in skipped:
        assert name in skipped_section, name
