"""PubMed/MEDLINE XML reader: real NLM files from ../shared/data plus small fixtures for bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from conftest import shared
from medfoundry.corpus.readers import pubmed_xml
from medfoundry.corpus.readers.base import Deletion, ReadContext, Record
from medfoundry.corpus.readers.pubmed_xml import read_pubmed_xml
from medfoundry.errors import InputError


def read(path: Path, strict: bool = True) -> tuple[list[Record], list[Deletion], ReadContext]:
    ctx = ReadContext(path, strict=strict)
    items = list(read_pubmed_xml(path, ctx))
    records = [item for item in items if isinstance(item, Record)]
    deletions = [item for item in items if isinstance(item, Deletion)]
    assert len(records) + len(deletions) == len(items)
    return records, deletions, ctx


def by_pmid(records: list[Record]) -> dict[str, Record]:
    index = {r.native_id: r for r in records}
    assert len(index) == len(records), "a PMID was emitted twice"
    return index


def article(pmid: str | None = "1", title: str = "A title.", abstract: str = "<AbstractText>Text.</AbstractText>"):
    """One PubmedArticle on a single line (so its line number is its position in the file)."""
    pmid_xml = f'<PMID Version="1">{pmid}</PMID>' if pmid else ""
    return (
        f"<PubmedArticle><MedlineCitation>{pmid_xml}<Article><Journal><JournalIssue><PubDate><Year>2020</Year>"
        f"</PubDate></JournalIssue><Title>A journal</Title></Journal><ArticleTitle>{title}</ArticleTitle>"
        f"<Abstract>{abstract}</Abstract><Language>eng</Language></Article></MedlineCitation></PubmedArticle>\n"
    )


def article_set(*entries: str) -> bytes:
    return ('<?xml version="1.0"?>\n<PubmedArticleSet>\n' + "".join(entries) + "</PubmedArticleSet>\n").encode()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


# --- real files -----------------------------------------------------------------------------------


def test_legacy_medline_file_counts_and_deletion():
    path = shared("corpus/pubmed_xml/medline16n0902.xml.gz")
    records, deletions, ctx = read(path)
    assert len(by_pmid(records)) == 604  # every citation, 78 of them without an abstract
    assert sum(r.meta["has_abstract"] for r in records) == 526
    assert all(r.text == r.meta["title"] for r in records if not r.meta["has_abstract"])
    assert deletions == [Deletion("26432306", 89981)]
    assert ctx.skips == []


def test_unlabelled_is_not_a_label():
    """NLM marks 10 paragraphs of this file Label="UNLABELLED": they come out without a label."""
    records = by_pmid(read(shared("corpus/pubmed_xml/medline16n0902.xml.gz"))[0])
    assert not any("UNLABELLED" in r.text for r in records.values())
    rec = records["26432138"]
    assert rec.text.startswith(f"{rec.meta['title']}\n\nThis is the first report of chronic postoperative")


def test_legacy_medline_record_fields():
    records = by_pmid(read(shared("corpus/pubmed_xml/medline16n0902.xml.gz"))[0])
    rec = records["17942999"]
    title = (
        "Neuroplasticity in the processing of pitch dimensions: "
        "a multidimensional scaling analysis of the mismatch negativity."
    )
    assert rec.line == 5
    assert rec.meta["pmid"] == "17942999"
    assert rec.meta["title"] == title
    assert rec.meta["journal"] == "Restorative neurology and neuroscience"
    assert rec.meta["year"] == 2007
    assert rec.meta["mesh"][:3] == ["Acoustic Stimulation", "Adult", "Data Interpretation, Statistical"]
    assert rec.meta["mesh"][-1] == "Pitch Perception" and len(rec.meta["mesh"]) == 11
    assert rec.meta["publication_types"] == ["Journal Article", "Research Support, Non-U.S. Gov't"]
    assert rec.meta["language"] == ["eng"]
    assert rec.meta["doi"] is None
    assert rec.text.startswith(title + "\n\nPURPOSE: An auditory electrophysiological study")
    assert rec.text.count("\n\n") == 4  # title + 4 labelled paragraphs
    assert "\n\nCONCLUSIONS: The MMN can serve" in rec.text

    # year from a MedlineDate ("2008 Jul-Aug"); doi from ELocationID
    rec = records["18621939"]
    assert rec.meta["year"] == 2008
    assert rec.meta["doi"] == "10.1176/appi.psy.49.4.332"
    assert "\n\nBACKGROUND: Establishing the correct alcohol use disorder" in rec.text


def test_legacy_translated_title_loses_brackets():
    records = by_pmid(read(shared("corpus/pubmed_xml/medline16n0902.xml.gz"))[0])
    rec = records["26407462"]  # <ArticleTitle>[Vaccines are drugs].</ArticleTitle>, Italian, no abstract
    assert rec.text == rec.meta["title"] == "Vaccines are drugs."
    assert rec.meta["has_abstract"] is False
    assert rec.meta["language"] == ["ita"]
    assert rec.meta["journal"] == "Epidemiologia e prevenzione"
    # brackets that are part of the title stay
    assert "marker [IGFBP7]·[TIMP2] reference range" in records["26702417"].meta["title"]


def test_current_baseline_format():
    path = shared("corpus/pubmed_xml/test_current_medline.xml.gz")
    records, deletions, ctx = read(path)
    assert deletions == [] and ctx.skips == []
    records = by_pmid(records)
    assert list(records) == ["36400559", "2930949", "11446611", "28786991"]
    first = records["36400559"]
    assert first.meta["title"] == "Back Pain: Differential Diagnosis and Management."
    assert first.meta["journal"] == "Neurologic clinics"
    assert first.meta["year"] == 2023
    assert first.meta["publication_types"] == ["Journal Article", "Review"]
    assert first.meta["language"] == ["eng"]
    assert first.meta["doi"] == "10.1016/j.ncl.2022.07.002"
    assert "persists for greater than 6 weeks" in first.text  # &#xa0; normalised to a space

    no_abstract = records["11446611"]
    assert no_abstract.text == "Acute back pain." and no_abstract.meta["has_abstract"] is False
    assert no_abstract.meta["year"] == 2001  # <Year>2001</Year><Season>May-Jun</Season>
    assert no_abstract.meta["doi"] == "10.7861/clinmedicine.1-3-188"  # only in PubmedData/ArticleIdList

    structured = records["28786991"]
    assert structured.meta["publication_types"] == ["Journal Article", "Meta-Analysis", "Review", "Systematic Review"]
    assert "\n\nOBJECTIVE: To synthesize outputs and outcomes" in structured.text
    assert "\n\nCONCLUSIONS: We observed high attrition" in structured.text
    assert structured.meta["mesh"] == ["Emigrants and Immigrants", "Humans", "Tuberculosis", "United States"]


def test_efetch_output():
    records, deletions, ctx = read(shared("corpus/pubmed_xml/pubmed-29768149.xml"))
    assert deletions == [] and ctx.skips == []
    (rec,) = records
    assert rec.native_id == rec.meta["pmid"] == "29768149"
    assert rec.line == 4
    assert rec.meta["title"] == "Inhaled Combined Budesonide-Formoterol as Needed in Mild Asthma."
    assert rec.meta["journal"] == "The New England journal of medicine"
    assert rec.meta["year"] == 2018
    assert rec.meta["doi"] == "10.1056/NEJMoa1715274"
    assert rec.meta["language"] == ["eng"]
    assert "Randomized Controlled Trial" in rec.meta["publication_types"]
    assert "Asthma" in rec.meta["mesh"] and len(rec.meta["mesh"]) == 23
    assert rec.text.startswith(rec.meta["title"] + "\n\nBACKGROUND: In patients with mild asthma")
    # the <sub>2</sub> text survives; efetch's pretty-printing put a newline before <sub>, hence "β 2"
    assert "fast-acting β 2-agonist may be" in rec.text
    assert "\n\nCONCLUSIONS: In patients with mild asthma, as-needed budesonide-formoterol" in rec.text
    assert "\t" not in rec.text and "  " not in rec.text


# --- fixtures -------------------------------------------------------------------------------------


def test_inline_markup_and_whitespace(tmp_path):
    abstract = (
        '<AbstractText Label="RESULTS">Growth of <i>E. coli</i> reached 10<sup>5</sup> CFU;\n'
        "   H<sub>2</sub>O<!-- an editor's comment --> and <b>bold</b> "
        '<mml:math xmlns:mml="http://www.w3.org/1998/Math/MathML"><mml:mi>x</mml:mi></mml:math>.</AbstractText>'
        '<AbstractText Label="UNLABELLED">Unlabelled second paragraph.</AbstractText>'
    )
    title = "[Role of [<sup>18</sup>F]FDG   PET in <i>vivo</i>]."
    path = write(tmp_path / "inline.xml", article_set(article("7", title, abstract)))
    (rec,) = read(path)[0]
    assert rec.meta["title"] == "Role of [18F]FDG PET in vivo."
    assert rec.text == (
        "Role of [18F]FDG PET in vivo.\n\n"
        "RESULTS: Growth of E. coli reached 10^5 CFU; H2O and bold x.\n\n"
        "Unlabelled second paragraph."
    )


@pytest.mark.parametrize(
    "xml, expected",
    [
        ("1.5 x 10<sup>-3</sup> M, 2x10<sup>7</sup>, <i>10</i><sup>−5</sup>", "1.5 x 10^-3 M, 2x10^7, 10^−5"),
        ("2<sup>-ΔΔCt</sup>, E = 10<sup>(−1/slope)</sup>", "2^-ΔΔCt, E = 10^(−1/slope)"),
        ("CD4<sup>+</sup> p27<sup>Kip1</sup> Fe2<sup>+</sup> IL-10<sup>−/−</sup>", "CD4+ p27Kip1 Fe2+ IL-10−/−"),
        ("21<sup>st</sup>; P = 0.01<sup>a</sup>; m<sup>2</sup>; CO<sub>2</sub>", "21st; P = 0.01a; m2; CO2"),
    ],
)
def test_exponents(tmp_path, xml, expected):
    path = write(tmp_path / "sup.xml", article_set(article("7", abstract=f"<AbstractText>{xml}</AbstractText>")))
    assert read(path)[0][0].text == f"A title.\n\n{expected}"


def test_book_article_and_multi_pmid_deletion(tmp_path):
    book = (
        "<PubmedBookArticle><BookDocument><PMID>20301295</PMID>"
        '<ArticleIdList><ArticleId IdType="doi">10.1000/book</ArticleId></ArticleIdList>'
        "<Book><BookTitle>GeneReviews</BookTitle><PubDate><Year>1993</Year></PubDate></Book>"
        "<ArticleTitle>Alpha Thalassemia</ArticleTitle><Language>eng</Language>"
        "<PublicationType>Review</PublicationType>"
        '<Abstract><AbstractText Label="CLINICAL CHARACTERISTICS">Alpha thalassemia has two forms.</AbstractText>'
        "</Abstract></BookDocument></PubmedBookArticle>\n"
    )
    deletion = '<DeleteCitation>\n<PMID Version="1">11</PMID>\n<PMID Version="1">12</PMID>\n</DeleteCitation>\n'
    path = write(tmp_path / "mixed.xml.gz", article_set(book, article("5"), deletion))
    records, deletions, _ = read(path)
    assert [r.native_id for r in records] == ["20301295", "5"]
    assert records[0].text == "Alpha Thalassemia\n\nCLINICAL CHARACTERISTICS: Alpha thalassemia has two forms."
    assert records[0].meta["year"] == 1993 and records[0].meta["doi"] == "10.1000/book"
    assert records[0].meta["publication_types"] == ["Review"]
    assert deletions == [Deletion("11", 6), Deletion("12", 7)]


def test_record_without_title_or_abstract_is_skipped(tmp_path):
    path = write(tmp_path / "bare.xml", article_set(article("1"), article("2", title="", abstract=""), article("3")))
    with pytest.raises(InputError, match="bare.xml:4: citation with neither title nor abstract"):
        read(path)
    records, _, ctx = read(path, strict=False)
    assert [r.native_id for r in records] == ["1", "3"]
    assert [(s.line, s.reason) for s in ctx.skips] == [(4, "citation with neither title nor abstract")]


def test_record_without_abstract_is_its_title(tmp_path):
    path = write(tmp_path / "title.xml", article_set(article("1", title="Only a title.", abstract="")))
    (rec,) = read(path)[0]
    assert (rec.text, rec.meta["has_abstract"]) == ("Only a title.", False)


def test_malformed_xml(tmp_path):
    broken = "<PubmedArticle><MedlineCitation><PMID>3</PMID></Oops>\n"
    path = write(tmp_path / "broken.xml", article_set(article("1"), article("2"), broken, article("4")))
    with pytest.raises(InputError) as err:
        read(path)
    assert err.value.line == 5
    assert "broken.xml:5: malformed XML" in str(err.value)

    records, _, ctx = read(path, strict=False)
    assert [r.native_id for r in records] == ["1", "2"]
    assert [(s.line, s.reason.startswith("malformed XML")) for s in ctx.skips] == [(5, True)]


def test_truncated_gzip(tmp_path):
    entries = (article(str(i), abstract=f"<AbstractText>Text {i}.</AbstractText>") for i in range(1, 3001))
    whole = gzip.compress(article_set(*entries))
    path = tmp_path / "cut.xml.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated or corrupt gzip"):
        read(path)

    records, _, ctx = read(path, strict=False)
    assert 0 < len(records) < 3000
    assert [r.native_id for r in records] == [str(i) for i in range(1, len(records) + 1)]
    assert len(ctx.skips) == 1 and "truncated or corrupt gzip" in ctx.skips[0].reason


@pytest.mark.parametrize("name", ["empty.xml", "empty.xml.gz"])
def test_empty_file(tmp_path, name):
    path = write(tmp_path / name, b"")
    with pytest.raises(InputError, match="empty file"):
        read(path)
    records, _, ctx = read(path, strict=False)
    assert records == [] and [s.reason for s in ctx.skips] == ["empty file"]


def test_record_without_pmid(tmp_path):
    path = write(tmp_path / "nopmid.xml", article_set(article("1"), article(None), article("3")))
    with pytest.raises(InputError, match="nopmid.xml:4: record without PMID"):
        read(path)
    records, _, ctx = read(path, strict=False)
    assert [r.native_id for r in records] == ["1", "3"]
    assert [(s.line, s.reason) for s in ctx.skips] == [(4, "record without PMID")]


def test_streams_large_file_with_flat_tree(tmp_path, monkeypatch):
    """20,000 articles all come out, and the parsed tree stays small however long the file is."""
    n = 20_000
    path = write(tmp_path / "big.xml.gz", article_set(*(article(str(i)) for i in range(n))))
    siblings_left = []
    entry = pubmed_xml._entry

    def spy(elem, ctx):
        siblings_left.append(len(elem.getparent()))
        return entry(elem, ctx)

    monkeypatch.setattr(pubmed_xml, "_entry", spy)
    records, _, _ = read(path)
    assert len(records) == n and records[-1].native_id == str(n - 1) and records[-1].line == n + 2
    # entries the parser has read ahead of the current one (one input chunk's worth), not all 20,000
    assert max(siblings_left) < 500


def test_an_entry_that_is_the_root_after_a_comment(tmp_path):
    """Found by atheris: a lone PubmedArticle as the document's root, preceded by a comment (a sibling with no
    parent element) is read, not a TypeError while the reader frees what precedes it."""
    path = write(tmp_path / "root.xml", ('<?xml version="1.0"?>\n<!-- one -->\n' + article("7")).encode())
    records, _, _ = read(path)
    assert [r.native_id for r in records] == ["7"]
