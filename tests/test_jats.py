"""JATS full-text reader: real PMC/PLOS articles from ../shared/data, plus small articles built here
for citation removal, layout and bad input."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from conftest import shared
from medfoundry.corpus.readers.base import ReadContext
from medfoundry.corpus.readers.jats import read_jats
from medfoundry.errors import InputError

PMC_FILE = "corpus/pmc_jats/1471-2180-11-174.nxml"  # BMC Microbiology, PMC archive DTD
PLOS_FILE = "corpus/pmc_jats/journal.pone.0152459.xml"  # PLOS ONE, journal publishing DTD 3.0
NUMERIC_CITATION = re.compile(r"(?<![\w\]])\[\d+(?:\s*[-–,]\s*\d+)*\]")  # not "F[1,12]"


def _read(path: Path, strict: bool = True, **options):
    ctx = ReadContext(path, strict=strict)
    return list(read_jats(path, ctx, **options)), ctx


def _one(path: Path, **options):
    records, _ = _read(path, **options)
    assert len(records) == 1
    return records[0]


def _headings(text: str, level: int) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#" * level + " ")]


# --- real articles ----------------------------------------------------------------------------


def test_pmc_article():
    path = shared(PMC_FILE)
    record = _one(path)
    assert record.native_id == "PMC3166277"
    assert record.meta == {
        "pmid": "21810267",
        "pmcid": "PMC3166277",
        "doi": "10.1186/1471-2180-11-174",
        "title": "Factors influencing lysis time stochasticity in bacteriophage λ",
        "journal": "BMC Microbiology",
        "year": 2011,
        "license": "http://creativecommons.org/licenses/by/2.0",
        "license_id": "CC-BY-2.0",
        "article_type": "research-article",
        "section_titles": ["Background", "Results", "Discussion", "Conclusions", "Appendix A", "Appendix B", "Methods"],
    }
    text = record.text
    assert text.startswith("# Factors influencing lysis time stochasticity in bacteriophage λ\n\nBackground: Despite")
    assert _headings(text, 2) == [f"## {t}" for t in record.meta["section_titles"]]
    assert "### Effect of allelic variation in holin sequence" in _headings(text, 3)
    # boilerplate sections, references and inline citations are gone
    assert "Competing interests" not in text and "Authors' contributions" not in text
    assert "Microbial cell individuality and the underlying sources of heterogeneity" not in text
    assert not NUMERIC_CITATION.search(text)
    assert "documented in many microbial organisms including bacteriophage (phage) λ, Escherichia coli," in text
    assert "A recent study by Amir et al. showed that 69%" in text
    caption = "Figure 2. Samples of a lysis recording and frequency distributions of various experimental treatments."
    assert caption in text
    assert "Table 1. Effects of holin allelic sequences on the stochasticity of lysis time." in text
    without = _one(path, captions=False).text
    assert caption not in without and "Table 1." not in without
    assert "A recent study by Amir et al. showed that 69%" in without


def test_plos_article():
    path = shared(PLOS_FILE)
    record = _one(path)
    assert record.native_id == "10.1371/journal.pone.0152459"
    meta = record.meta
    assert (meta["pmid"], meta["pmcid"], meta["doi"]) == (None, None, "10.1371/journal.pone.0152459")
    assert meta["title"] == "Prognostic Value of Overexpressed p16INK4a in Vulvar Cancer: A Meta-Analysis"
    assert (meta["journal"], meta["year"], meta["article_type"]) == ("PLOS ONE", 2016, "research-article")
    assert (meta["license"], meta["license_id"]) == ("http://creativecommons.org/licenses/by/4.0/", "CC-BY-4.0")
    text = record.text
    # the "Supporting Information" section only lists supplementary files: dropped
    assert _headings(text, 2) == ["## Introduction", "## Methods", "## Results", "## Discussion"]
    assert meta["section_titles"] == ["Introduction", "Methods", "Results", "Discussion"]
    assert _headings(text, 3)[:2] == ["### Search strategy", "### Inclusion criteria"]
    assert "\n\nObjective: This study aimed to examine the prognostic value" in text  # structured abstract
    assert not NUMERIC_CITATION.search(text)
    assert "ranging from 4 to 1287 per study.Among them" in text  # (sic: no space in the source)
    assert "Vulvar cancer in young women: demographic features and outcome evaluation" not in text
    assert "Thanks to the editors and anonymous reviewers" not in text  # acknowledgements
    caption = "Fig 1. Flow chart demonstrating studies processed for inclusion in the meta-analysis."
    assert caption in text
    assert caption not in _one(path, captions=False).text


def test_author_summary_is_not_the_abstract():
    text = _one(shared("corpus/pmc_jats/journal.pcbi.1001083.xml")).text
    assert text.split("\n\n")[1].startswith("De novo computational design of synthetic gene circuits")
    assert "Author Summary" not in text
    assert "Synthetic Biology is a novel discipline" not in text


def test_licence_stated_in_copyright_statement():
    meta = _one(shared("corpus/pmc_jats/pone.0000217.nxml")).meta
    assert "Creative Commons Attribution License" in meta["license"]
    assert meta["license_id"] == "CC-BY"  # no version stated
    assert meta["pmcid"] == "PMC1790863" and meta["year"] == 2007


@pytest.mark.parametrize(
    "name, license_id",
    [
        ("mds526.nxml", "CC-BY-NC-3.0"),  # license/@xlink:href
        ("journal.pcbi.1004082.xml", "CC-BY-4.0"),
        ("journal.pone.0160653.xml", "CC0-1.0"),  # publicdomain/zero URL
        ("journal.pone.0068090.xml", "CC0-1.0"),  # "Creative Commons CC0 public domain dedication", no URL
        ("ehp-116-1694.nxml", "CC-PDM-1.0"),  # publicdomain/mark URL
        ("journal.pmed.0020402.xml", "CC-PDDC"),  # "Creative Commons Public Domain Declaration"
        ("journal.pbio.0020188.xml", "CC-BY"),  # "Creative Commons Attribution License", no version
        ("journal.pmed.1001080.xml", "other"),  # WHO's own terms
        ("6605965a.nxml", None),  # no licence stated
    ],
)
def test_license_id_of_real_files(name, license_id):
    meta = _one(shared(f"corpus/pmc_jats/{name}")).meta
    assert meta["license_id"] == license_id
    assert (meta["license"] is None) == (license_id is None)


@pytest.mark.parametrize(
    "license_p, license_id",
    [
        ("Creative Commons Attribution-NonCommercial-NoDerivs 3.0 Unported License", "CC-BY-NC-ND-3.0"),
        ("the Creative Commons Attribution 4.0 International License (CC BY 4.0)", "CC-BY-4.0"),
        ("a CC BY-NC-SA 4.0 licence", "CC-BY-NC-SA-4.0"),
        ("Creative Commons Attribution License, version 2.5", "CC-BY-2.5"),
        ('<ext-link xlink:href="http://creativecommons.org/licenses/by-sa/3.0/">it</ext-link>', "CC-BY-SA-3.0"),
        ("Free to read; all other rights reserved.", "other"),
    ],
)
def test_license_id_from_name_or_url(tmp_path, license_p, license_id):
    ids = f"<permissions><license><license-p>{license_p}</license-p></license></permissions>"
    assert _one(_article(tmp_path, body="<p>Body.</p>", ids=ids)).meta["license_id"] == license_id


def test_all_real_files_parse_strict():
    folder = shared("corpus/pmc_jats")
    files = sorted(folder.iterdir())
    # README says 71 (10 PMC + 61 PLOS); the folder holds 9 PMC .nxml and 61 PLOS .xml files.
    assert len(files) == 70
    records = [r for f in files for r in read_jats(f, ReadContext(f, strict=True))]
    assert len(records) == len(files)
    assert len({r.native_id for r in records}) == len(records)
    for record in records:
        assert record.text.startswith("# ") and len(record.text) > 500, record.native_id
        assert "\x00" not in record.text and "[]" not in record.text and "[, " not in record.text
        assert "\x01" not in record.text and "()" not in record.text and "(, " not in record.text
        assert record.meta["year"] and record.meta["doi"], record.native_id


def test_articleset_yields_every_article(tmp_path):
    """Two real PMC articles in one <pmc-articleset> (as efetch returns them) read as they do alone."""
    names = ["1471-2180-11-174.nxml", "pone.0000217.nxml"]
    paths = [shared(f"corpus/pmc_jats/{name}") for name in names]
    articles = [re.search(r"<article\b.*</article>", p.read_text(encoding="utf-8"), re.S).group() for p in paths]
    articleset = tmp_path / "set.xml"
    articleset.write_text(f"<pmc-articleset>\n{articles[0]}\n{articles[1]}\n</pmc-articleset>\n", encoding="utf-8")
    records = _read(articleset)[0]
    assert [r.native_id for r in records] == ["PMC3166277", "PMC1790863"]
    for record, path in zip(records, paths):
        alone = _one(path)
        assert (record.text, record.meta) == (alone.text, alone.meta)


def test_articleset_ids_lines_and_sub_articles(tmp_path):
    sub_article = '<sub-article article-type="reply"><body><p>Reply text.</p></body></sub-article>'
    with_ids = ARTICLE.split("\n", 3)[3].format(  # without the XML declaration and DOCTYPE
        body="<p>First body.</p>", abstract="", ids='<article-id pub-id-type="pmc">11</article-id>', extra=sub_article
    )
    without_ids = ARTICLE.split("\n", 3)[3].format(body="<p>Second body.</p>", abstract="", ids="", extra="")
    empty = "<article><front><article-meta/></front></article>"
    path = tmp_path / "set.xml"
    path.write_text(f"<pmc-articleset>\n{with_ids}{without_ids}{empty}\n</pmc-articleset>", encoding="utf-8")
    records, ctx = _read(path, strict=False)
    # lines are where each <article> start tag ends; the sub-article is neither a record nor part of the text
    assert [(r.native_id, r.line, r.text.rsplit("\n", 1)[-1]) for r in records] == [
        ("PMC11", 3, "First body."),
        ("set#2", 19, "Second body."),
    ]
    assert [(s.reason, s.line) for s in ctx.skips] == [("no article text", 34)]
    with pytest.raises(InputError, match="set.xml:34: no article text"):
        _read(path, strict=True)


# --- built articles ---------------------------------------------------------------------------

ARTICLE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.0 20120330//EN"
  "JATS-archivearticle1.dtd">
<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:mml="http://www.w3.org/1998/Math/MathML"
  article-type="research-article">
<front>
<journal-meta><journal-title-group><journal-title>Test Journal</journal-title></journal-title-group></journal-meta>
<article-meta>
{ids}
<title-group><article-title>A test article<xref ref-type="fn" rid="fn1">*</xref></article-title></title-group>
<pub-date pub-type="epub"><day>1</day><month>2</month><year>2020</year></pub-date>
{abstract}
</article-meta>
</front>
<body>{body}</body>
<back><ack><p>We thank the reviewers.</p></ack>
<ref-list><ref id="r1"><mixed-citation>Smith J. A distinctive reference title.</mixed-citation></ref></ref-list></back>
{extra}
</article>
"""


def _article(tmp_path: Path, body: str = "", abstract: str = "", ids: str = "", extra: str = "",
             name: str = "article.nxml") -> Path:  # fmt: skip
    path = tmp_path / name
    path.write_text(ARTICLE.format(body=body, abstract=abstract, ids=ids, extra=extra), encoding="utf-8")
    return path


def _cite(n: str, brackets: bool = False) -> str:
    return f'<xref ref-type="bibr" rid="r{n}">{"[" + n + "]" if brackets else n}</xref>'


CITATIONS = [
    (f"as shown {_cite('3', True)}, {_cite('4', True)}–{_cite('6', True)}.", "as shown."),
    (f"shown ({_cite('1')}, {_cite('2')}).", "shown."),
    (f"genotypes [{_cite('1')}-{_cite('9')}]. Next", "genotypes. Next"),
    (f"cells<sup>{_cite('1')},{_cite('2')}</sup> divide", "cells divide"),
    (f"a random variable (see [{_cite('4')}–{_cite('6')}]).", "a random variable."),
    (f"too large (see, e.g., [{_cite('7')}, {_cite('12')}]).", "too large."),
    (f"the type locality ({_cite('12')}, p. 67).", "the type locality."),
    (f'a model ({_cite("12")}; <xref ref-type="fig" rid="f2">Figure 2</xref>).', "a model (Figure 2)."),
    (f'as in <xref ref-type="fig" rid="f1">Figure 1</xref> [{_cite("3")}].', "as in Figure 1."),
    (f"Amir <italic>et al.</italic> [{_cite('10')}] showed", "Amir et al. showed"),
    (f"defined as SD/MLT; [{_cite('10')}])", "defined as SD/MLT)"),
    ("levels (n = 12) of [Ca<sup>2+</sup>] rose (see Methods).", "levels (n = 12) of [Ca2+] rose (see Methods)."),
    (f"since 2005<sup>{_cite('3')}</sup> and 10<sup>[{_cite('4')}]</sup> times", "since 2005 and 10 times"),
]


@pytest.mark.parametrize("xml, expected", CITATIONS, ids=[e for _, e in CITATIONS])
def test_citation_removal(tmp_path, xml, expected):
    path = _article(tmp_path, body=f"<sec><title>Intro</title><p>{xml}</p></sec>")
    assert _one(path).text.endswith(f"## Intro\n\n{expected}")


LAYOUT_BODY = """
<p>Opening   paragraph
   with  line breaks.<fn id="fn2"><p>A footnote.</p></fn></p>
<sec sec-type="intro"><title>Introduction</title>
  <p>First.</p>
  <sec><title>Sub <italic>one</italic></title>
    <p>Nested text <inline-formula><mml:math><mml:mi>x</mml:mi> <mml:mo>=</mml:mo>
      <mml:mn>2</mml:mn><mml:annotation encoding="TeX">x=2</mml:annotation></mml:math></inline-formula>.</p>
    <sec><title>Deeper</title><p>Deep text.</p></sec>
  </sec>
</sec>
<sec><title>Results</title>
  <p>Before the list:<list list-type="bullet"><list-item><p>alpha</p></list-item>
    <list-item><p>beta</p><list><list-item><p>beta one</p></list-item></list></list-item></list>after the list.</p>
  <fig id="f1"><label>Figure 1</label><caption><title>Growth curves</title><p>Cells grew.</p></caption>
    <graphic xlink:href="f1.tif"/></fig>
  <table-wrap id="t1"><label>Table 1.</label><caption><p>Counts per group.</p></caption>
    <table><tr><td>cell-value-42</td></tr></table>
    <table-wrap-foot><fn><p>Table footnote text.</p></fn></table-wrap-foot></table-wrap>
  <supplementary-material id="s1"><label>Data S1</label><caption><p>Raw data file.</p></caption>
  </supplementary-material>
</sec>
<sec><title>Empty section</title><supplementary-material id="s2"><label>Text S1</label></supplementary-material></sec>
<sec sec-type="supplementary-material"><title>Additional material</title><p>Download it.</p></sec>
<sec><title>Competing interests</title><p>None declared.</p></sec>
"""
LAYOUT_ABSTRACT = """
<abstract><sec><title>Background</title><p>Why.</p></sec><sec><title>Results:</title><p>What.</p></sec></abstract>
<abstract abstract-type="summary"><title>Author Summary</title><p>Lay summary.</p></abstract>
"""
LAYOUT_EXPECTED = """# A test article

Background: Why.

Results: What.

Opening paragraph with line breaks.

## Introduction

First.

### Sub one

Nested text x=2.

#### Deeper

Deep text.

## Results

Before the list:

- alpha
- beta
  - beta one

after the list.

Figure 1. Growth curves. Cells grew.

Table 1. Counts per group."""


def test_layout(tmp_path):
    sub_article = '<sub-article article-type="reply"><body><p>Reply text.</p></body></sub-article>'
    path = _article(tmp_path, body=LAYOUT_BODY, abstract=LAYOUT_ABSTRACT, extra=sub_article)
    record = _one(path)
    assert record.text == LAYOUT_EXPECTED
    assert record.meta["section_titles"] == ["Introduction", "Results"]
    without = _one(path, captions=False).text
    assert without == LAYOUT_EXPECTED.rsplit("\n\nFigure 1.", 1)[0]


MATH_X2 = "<mml:math><mml:msup><mml:mi>x</mml:mi><mml:mn>2</mml:mn></mml:msup></mml:math>"
FORMULAS = [
    (
        f'Then we have<disp-formula id="e1"><label>(1)</label>{MATH_X2}</disp-formula>where x is real.',
        "Then we have\n\nx^2\n\nwhere x is real.",
    ),
    (
        '<disp-formula id="e2"><graphic xlink:href="e2.tif"/></disp-formula>Text after an image formula.',
        "Text after an image formula.",
    ),
]
IMAGE = '<inline-formula><inline-graphic xlink:href="i.gif"/></inline-formula>'
INLINE = [
    (
        "10<sup>5</sup> CFU of CO<sub>2</sub>-fixing CD4<sup>+</sup> p27<sup>Kip1</sup>",
        "10^5 CFU of CO2-fixing CD4+ p27Kip1",
    ),
    (
        "10<sup>−3</sup> M, 1.5x10<sup>(−1/k)</sup>, 21<sup>st</sup>, 0.01<sup>a</sup>",
        "10^−3 M, 1.5x10^(−1/k), 21st, 0.01a",
    ),
    (f"rate <inline-formula>{MATH_X2}</inline-formula> and e<sup>x</sup>.", "rate x^2 and ex."),
    (f"the parameters ({IMAGE}, {IMAGE}, and {IMAGE}) between runs", "the parameters between runs"),
    (f"full rank ( = {IMAGE}).", "full rank."),
    (f"the data, {IMAGE}, i.e. the sample", "the data, i.e. the sample"),
    (f"low values ({IMAGE} of the rate)", "low values (of the rate)"),
    (f"where {IMAGE} and {IMAGE} are counts", "where are counts"),
]


@pytest.mark.parametrize("xml, expected", FORMULAS + INLINE, ids=[e for _, e in FORMULAS + INLINE])
def test_formulas_and_superscripts(tmp_path, xml, expected):
    assert _one(_article(tmp_path, body=f"<p>{xml}</p>")).text.endswith(f"\n\n{expected}")


def test_definition_list(tmp_path):
    def_list = (
        "<def-list><title>Abbreviations</title>"
        "<def-item><term>BMI</term><def><p>body mass index</p></def></def-item>"
        "<def-item><term>CI</term><def><p>confidence interval</p></def></def-item></def-list>"
    )
    body = f"<sec><title>Terms</title><p>We use these terms:{def_list}in the text.</p>{def_list}</sec>"
    terms = "Abbreviations\nBMI: body mass index\nCI: confidence interval"
    assert _one(_article(tmp_path, body=body)).text.endswith(
        f"## Terms\n\nWe use these terms:\n\n{terms}\n\nin the text.\n\n{terms}"
    )


def test_real_formulas_and_exponents():
    texts = {
        name: _one(shared(f"corpus/pmc_jats/{name}")).text
        for name in ["journal.pcbi.1004156.xml", "journal.ppat.1002735.xml", "journal.pone.0074790.xml",
                     "journal.pcbi.1004082.xml", "journal.pone.0008915.xml"]
    }  # fmt: skip
    display = "note that the quasi-potential\n\nS(x)=−limϵ→0ϵlnP(x),\n\nwhere P(x) ∝"  # <disp-formula> in a <p>
    assert display in texts["journal.pcbi.1004156.xml"]
    assert "DWV genome copies of 1.66×10^3 and 16.6" in texts["journal.ppat.1002735.xml"]
    assert "incubated with 2x10^7 target erythrocytes" in texts["journal.pone.0074790.xml"]
    assert "where σs^2 is" in texts["journal.pcbi.1004082.xml"]  # MathML <msup>
    # image-only inline formulas: no "( )" or ", ," debris is left
    assert "specified body of data, i.e. for which" in texts["journal.pone.0008915.xml"]
    assert not re.search(r"\(\s*[,;]?\s*\)|,\s*,", texts["journal.pone.0008915.xml"])


def test_floats_group_captions(tmp_path):
    fig = '<fig id="f9"><label>Figure 9</label><caption><p>Floating.</p></caption></fig>'
    floats = f"<floats-group>{fig}</floats-group>"
    path = _article(tmp_path, body="<p>Body.</p>", extra=floats)
    assert _one(path).text.endswith("Body.\n\nFigure 9. Floating.")
    assert _one(path, captions=False).text.endswith("Body.")


def test_metadata_and_ids(tmp_path):
    ids = """<article-id pub-id-type="pmid">123</article-id><article-id pub-id-type="pmc">4567</article-id>
    <article-id pub-id-type="doi">10.1/x</article-id>
    <permissions><license license-type="open-access"><license-p>See
    <ext-link ext-link-type="uri" xlink:href="https://creativecommons.org/licenses/by/4.0/">CC BY</ext-link>.
    </license-p></license></permissions>"""
    record = _one(_article(tmp_path, body="<p>Body.</p>", ids=ids))
    assert record.native_id == "PMC4567"
    assert record.meta == {
        "pmid": "123", "pmcid": "PMC4567", "doi": "10.1/x", "title": "A test article", "journal": "Test Journal",
        "year": 2020, "license": "https://creativecommons.org/licenses/by/4.0/", "license_id": "CC-BY-4.0",
        "article_type": "research-article", "section_titles": [],
    }  # fmt: skip
    doi_only = _one(_article(tmp_path, body="<p>Body.</p>", ids='<article-id pub-id-type="doi">10.1/y</article-id>'))
    assert doi_only.native_id == "10.1/y" and doi_only.meta["license"] is doi_only.meta["license_id"] is None
    assert _one(_article(tmp_path, body="<p>Body.</p>", name="plain.xml")).native_id == "plain"


def test_gzipped_file(tmp_path):
    path = _article(tmp_path, body="<p>Body.</p>")
    gz = tmp_path / "article.nxml.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    record = _one(gz)
    assert record.native_id == "article" and record.text == _one(path).text


@pytest.mark.parametrize("damage", ["truncated", "bad-crc", "not-gzip"])
def test_truncated_or_corrupt_gzip(tmp_path, damage):
    data = gzip.compress(shared(PLOS_FILE).read_bytes())
    data = {
        "truncated": data[: len(data) // 2],  # EOFError
        "bad-crc": data[:-8] + bytes(8),  # BadGzipFile (an OSError)
        "not-gzip": b"<article/>",
    }[damage]
    path = tmp_path / "cut.xml.gz"
    path.write_bytes(data)
    with pytest.raises(InputError, match="cut.xml.gz: truncated or corrupt gzip"):
        _read(path, strict=True)
    records, ctx = _read(path, strict=False)
    assert records == [] and len(ctx.skips) == 1 and ctx.skips[0].reason.startswith("truncated or corrupt gzip: ")


def test_external_entities_are_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    path = tmp_path / "xxe.xml"
    path.write_text(
        f'<!DOCTYPE article PUBLIC "-//NLM//DTD JATS//EN" "JATS.dtd" [<!ENTITY xxe SYSTEM "file://{secret}">]>'
        "<article><body><p>Before &xxe; after &nbsp;end.</p></body></article>"
    )
    with pytest.raises(InputError, match=r"xxe\.xml:1: document declares XML entities \(xxe\)") as refused:
        _one(path)  # refused whole (tests/test_hostile_xml.py has the other attacks)
    assert "TOP-SECRET-VALUE" not in str(refused.value)
    path.write_text(
        '<!DOCTYPE article PUBLIC "-//NLM//DTD JATS//EN" "JATS.dtd">'
        "<article><body><p>Before &ndash; after &nbsp;end.</p></body></article>"
    )
    assert _one(path).text == "Before – after end."  # undeclared: kept as the HTML character; &nbsp; is whitespace


# --- bad input --------------------------------------------------------------------------------


def test_malformed_xml(tmp_path):
    path = tmp_path / "broken.nxml"
    path.write_text("<article>\n<body>\n<p>Unclosed paragraph\n</body>\n</article>\n")
    with pytest.raises(InputError, match="malformed XML") as err:
        _read(path, strict=True)
    assert "broken.nxml" in str(err.value) and err.value.line is not None
    records, ctx = _read(path, strict=False)
    assert records == []
    assert len(ctx.skips) == 1 and ctx.skips[0].reason.startswith("malformed XML: ")


@pytest.mark.parametrize("content", ["", "  \n"], ids=["zero-bytes", "whitespace"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.nxml"
    path.write_text(content)
    with pytest.raises(InputError, match="empty file"):
        _read(path, strict=True)
    records, ctx = _read(path, strict=False)
    assert records == [] and [s.reason for s in ctx.skips] == ["empty file"]


@pytest.mark.parametrize(
    "xml, line",
    [
        ("<pmc-articleset>\n</pmc-articleset>", None),
        (ARTICLE.format(body="", abstract="", ids="", extra=""), 5),  # the <article> line
    ],
    ids=["no-article-root", "no-body-no-abstract"],
)
def test_no_article_text(tmp_path, xml, line):
    path = tmp_path / "hollow.xml"
    path.write_text(xml, encoding="utf-8")
    with pytest.raises(InputError, match="no article text"):
        _read(path, strict=True)
    records, ctx = _read(path, strict=False)
    assert records == [] and [(s.reason, s.line) for s in ctx.skips] == [("no article text", line)]
