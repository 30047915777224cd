"""Hostile XML: entity expansion (billion laughs, quadratic blowup), external entities (XXE) pointing at a local
file or a URL, external DTDs and parameter entities, and nesting deep enough to exhaust a recursive reader. The
PubMed and JATS readers, and `corpus build` over them, must refuse each with an error naming the file (strict) or
skip and report it (lenient): never expand an entity, read the local file or make a request."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from fuzz_targets import COMPLEX_LAYOUTS, LAUGHS, READERS, SECRET, attacks, complex_text, jats, pubmed, recording_server
from medfoundry.config import validate
from medfoundry.corpus.build import build_corpus
from medfoundry.corpus.config import CorpusConfig
from medfoundry.corpus.readers.base import ReadContext
from medfoundry.corpus.readers.jats import read_jats
from medfoundry.corpus.readers.pubmed_xml import read_pubmed_xml
from medfoundry.errors import InputError

pytestmark = pytest.mark.timeout(120)  # an expanding parser would take minutes and gigabytes, not seconds


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.txt"
    path.write_text(SECRET)
    return path


@pytest.fixture(scope="module")
def server():
    """A local HTTP server that records every connection and request: an attack URL must never be fetched."""
    with recording_server() as (url, requests):
        yield url, requests


def _read(reader, path: Path, strict: bool):
    ctx = ReadContext(path, strict=strict)
    return list(reader(path, ctx)), ctx


@pytest.mark.parametrize(
    "attack",
    [
        "billion_laughs",
        "quadratic_blowup",
        "xxe_local_file",
        "xxe_url",
        "parameter_entity_url",
        "parameter_entity_file",
    ],
)
@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_entity_attacks_are_refused_without_expansion_or_access(kind, attack, tmp_path, secret_file, server):
    url, requests = server
    reader, make, suffix = READERS[kind]
    doctype, title = attacks(secret_file, url)[attack]
    path = tmp_path / f"evil.{suffix}"
    path.write_bytes(make(doctype, title=title))

    with pytest.raises(InputError) as refused:
        _read(reader, path, strict=True)
    assert str(path) in str(refused.value) and SECRET not in str(refused.value)

    items, ctx = _read(reader, path, strict=False)
    assert items == [] and len(ctx.skips) == 1 and ctx.skips[0].path == str(path)
    assert SECRET not in ctx.skips[0].reason
    if attack in ("billion_laughs", "quadratic_blowup"):  # libxml2 may stop these first, checking the entity once
        assert re.search(r"declares XML entities|refused: its entities would expand enormously", ctx.skips[0].reason)
    elif attack in ("xxe_local_file", "xxe_url"):
        assert "declares XML entities" in ctx.skips[0].reason
    assert requests == []


@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_external_dtd_is_neither_fetched_nor_needed(kind, tmp_path, server):
    """Real files name their DTD by URL (PubMed: https://dtd.nlm.nih.gov/...): it is not loaded, and the file reads."""
    url, requests = server
    reader, make, suffix = READERS[kind]
    path = tmp_path / f"real.{suffix}"
    path.write_bytes(make(f'<!DOCTYPE r PUBLIC "-//NLM//DTD Test//EN" "{url}/dtd">'))
    (record,), ctx = _read(reader, path, strict=True)
    assert ("stroke" if kind == "pubmed" else "malaria") in record.text.lower() and not ctx.skips
    assert requests == []


def test_gzipped_billion_laughs_is_refused(tmp_path):
    path = tmp_path / "evil.xml.gz"
    path.write_bytes(gzip.compress(pubmed(f"<!DOCTYPE r [{LAUGHS}]>", title="&lol9;")))
    with pytest.raises(
        InputError,
        match=r"evil\.xml\.gz:\d+: (refused: its entities would expand enormously|"
        r"document declares XML entities \(lol, lol1)",
    ):
        _read(read_pubmed_xml, path, strict=True)


def test_a_file_declaring_entities_yields_no_record_at_all(tmp_path):
    """Declarations live in the DOCTYPE, before the first record: the whole file is refused, even its records that
    use no entity."""
    first = pubmed('<!DOCTYPE r [<!ENTITY t "Expanded title">]>', title="&t;")
    second = pubmed(pmid="2").split(b"<PubmedArticleSet>")[1].split(b"</PubmedArticleSet>")[0]
    path = tmp_path / "two.xml"
    path.write_bytes(first.replace(b"</PubmedArticleSet>", second + b"</PubmedArticleSet>"))
    items, ctx = _read(read_pubmed_xml, path, strict=False)
    assert items == [] and "declares XML entities (t)" in ctx.skips[0].reason


@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_undeclared_entities_are_kept_unexpanded(kind, tmp_path):
    """With the DTD not loaded, an entity a real file uses (&ndash;) stays a reference, read as the HTML character
    it names: nothing fails and nothing is fetched."""
    reader, make, suffix = READERS[kind]
    path = tmp_path / f"entities.{suffix}"
    path.write_bytes(make('<!DOCTYPE r PUBLIC "-//NLM//DTD Test//EN" "missing.dtd">', title="Stroke&ndash;risk"))
    (record,), _ = _read(reader, path, strict=True)
    assert "Stroke–risk" in record.text


@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_deep_nesting_is_a_clear_error_not_a_recursion_crash(kind, tmp_path):
    reader, make, suffix = READERS[kind]
    path = tmp_path / f"deep.{suffix}"
    path.write_bytes(make(title="<i>" * 20_000 + "deep" + "</i>" * 20_000))
    with pytest.raises(InputError, match=r"deep\..*malformed XML: .*depth"):
        _read(reader, path, strict=True)


def test_nesting_within_the_parser_limit_renders(tmp_path):
    """Up to the parser's depth limit the recursive JATS layout stays far from Python's recursion limit."""
    sections = "".join(f"<sec><title>Level {i}</title><p>Text {i}.</p>" for i in range(120)) + "</sec>" * 120
    path = tmp_path / "nested.nxml"
    path.write_bytes(jats(body="<italic>" * 200 + "deep" + "</italic>" * 200 + "</p>" + sections + "<p>end"))
    (record,), _ = _read(read_jats, path, strict=True)
    assert "deep" in record.text and "Level 119" in record.text


@pytest.mark.parametrize("layout", sorted(COMPLEX_LAYOUTS))
@pytest.mark.parametrize("kind", ["pubmed", "jats"])
def test_text_the_layout_could_spend_quadratic_time_on_reads_in_linear_time(kind, layout, tmp_path):
    """Found by the fuzz group of the reliability report: 100 kB of such text took minutes (searching the whole
    text before each superscript, a regex pass per level of brackets, regexes retried from each character of a
    run of separators); a year of 100,000 digits was a bare ValueError from int()."""
    import time

    reader, make, suffix = READERS[kind]
    path = tmp_path / f"slow.{suffix}"
    path.write_bytes(make(title=complex_text(layout, 100_000)))
    began = time.monotonic()
    items, ctx = _read(reader, path, strict=False)
    assert time.monotonic() - began < 5
    assert len(items) + len(ctx.skips) == 1


def test_a_gzip_bomb_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr("medfoundry.limits.MAX_ENTRY_BYTES", 1 << 20)
    path = tmp_path / "bomb.nxml.gz"
    path.write_bytes(gzip.compress(jats(body="A" * (8 << 20))))
    with pytest.raises(InputError, match=r"bomb\.nxml\.gz:3: <article> entry with more than 1 MiB of XML"):
        _read(read_jats, path, strict=True)


# --- through `corpus build` -------------------------------------------------------------------------


@pytest.fixture
def build_inputs(tmp_path, secret_file, server) -> Path:
    url, _ = server
    root = tmp_path / "in"
    (root / "pubmed").mkdir(parents=True)
    (root / "pmc").mkdir()
    (root / "pubmed" / "good.xml").write_bytes(pubmed(pmid="11"))
    (root / "pubmed" / "laughs.xml.gz").write_bytes(
        gzip.compress(pubmed(f"<!DOCTYPE r [{LAUGHS}]>", title="&lol9;", pmid="12"))
    )
    (root / "pmc" / "good.nxml").write_bytes(jats())
    xxe = attacks(secret_file, url)
    (root / "pmc" / "xxe.nxml").write_bytes(
        jats(xxe["xxe_local_file"][0], title=xxe["xxe_local_file"][1], pmcid="PMC2")
    )
    (root / "pmc" / "fetch.nxml").write_bytes(jats(xxe["xxe_url"][0], title=xxe["xxe_url"][1], pmcid="PMC3"))
    return root


def _config(root: Path, out: Path, strict: bool) -> CorpusConfig:
    return validate(
        CorpusConfig,
        {
            "output_dir": str(out),
            "workers": 1,
            "strict": strict,
            "sources": [
                {"name": "pubmed", "kind": "pubmed_xml", "paths": [str(root / "pubmed" / "*")]},
                {"name": "papers", "kind": "jats", "paths": [str(root / "pmc" / "*.nxml")]},
            ],
            "decontam": {"enabled": False},
            "split": {"val_fraction": 0.0},
            "clean": {"min_chars": 50, "min_words": 5},
        },
    )


def test_corpus_build_lenient_skips_and_reports_each_hostile_file(build_inputs, tmp_path, server):
    import json

    out = tmp_path / "corpus"
    manifest = build_corpus(_config(build_inputs, out, strict=False))
    assert manifest.counts["documents_train"] == 2  # the two good documents
    with gzip.open(out / "dropped.jsonl.gz", "rt") as fh:
        skipped = {
            Path(d["detail"].split(":")[0]).name: d["detail"] for d in map(json.loads, fh) if d["stage"] == "read"
        }
    assert set(skipped) == {"laughs.xml.gz", "xxe.nxml", "fetch.nxml"}
    assert "declares XML entities" in skipped["xxe.nxml"] and "declares XML entities" in skipped["fetch.nxml"]
    assert re.search(r"declares XML entities|expand enormously", skipped["laughs.xml.gz"])
    for path in out.rglob("*"):  # the secret is in no output file (gzipped or not)
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in (gzip.decompress(data) if path.suffix == ".gz" else data), path
    assert server[1] == []


def test_corpus_build_strict_stops_at_a_hostile_file_naming_it(build_inputs, tmp_path):
    with pytest.raises(
        InputError,
        match=r"(laughs\.xml\.gz|xxe\.nxml|fetch\.nxml):\d+: .*(declares XML entities|"
        r"expand enormously)",
    ) as refused:
        build_corpus(_config(build_inputs, tmp_path / "strict", strict=True))
    assert SECRET not in str(refused.value)
    assert not (tmp_path / "strict" / "manifest.json").exists()
