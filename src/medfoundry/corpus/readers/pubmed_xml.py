"""PubMed / MEDLINE XML reader (``.xml`` or ``.xml.gz``).

Handles the current ``PubmedArticleSet`` format (baseline/update files and efetch output), the
legacy ``MedlineCitationSet`` DTD (MEDLINE files up to 2016, where ``MedlineCitation`` is a
top-level element), ``PubmedBookArticle`` entries and ``DeleteCitation`` lists.

Files are streamed entry by entry through :class:`medfoundry.corpus.readers.safe_xml.EntryStream`, which frees
each entry once it has been turned into a record, and whatever else the parser has finished as it goes, so
memory stays flat whatever the file holds. Entities are never expanded, no DTD or external entity is loaded, and
a file that declares entities, or whose root is not a PubMed set, is refused.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lxml import etree

from medfoundry.corpus.readers import safe_xml
from medfoundry.corpus.readers.base import Deletion, ReadContext, Record
from medfoundry.io import open_binary

_ENTRY_TAGS = ("PubmedArticle", "MedlineCitation", "PubmedBookArticle", "DeleteCitation")
_ROOTS = ("PubmedArticleSet", "MedlineCitationSet", "PubmedBookArticleSet")  # a lone entry may be the root too
_YEAR = re.compile(r"\d{4}")
# A superscript that is an exponent of the number just before it: 10<sup>5</sup>, 10<sup>−3</sup>,
# 10<sup>(−1/slope)</sup>, 2<sup>−ΔΔCt</sup>. Not CD4<sup>+</sup>, p27<sup>Kip1</sup>, 21<sup>st</sup>,
# 0.01<sup>a</sup> (a footnote mark).
_NUMBER_BEFORE = re.compile(r"(?:(?<![^\W\d_])|(?<=\dx))[\d.]*\d$")  # "10", "1.5x10"; not the "4" of "CD4"
_EXPONENT = re.compile(r"[-+−–]?\d|[-−–]?\(|[-−–]\w")
_EMPTY = etree.Element("empty")  # stands in for a missing parent element; never modified


def read_pubmed_xml(path: Path, ctx: ReadContext) -> Iterator[Record | Deletion]:
    """Yield one :class:`Record` per citation and one :class:`Deletion` per deleted PMID.

    A citation without an abstract is emitted with its title as text and ``meta["has_abstract"]``
    False: whether to keep it is the caller's choice. One with neither title nor abstract, or without
    a PMID, is skipped through ``ctx``, as is an entry over the size limits (see :class:`safe_xml.EntryStream`).
    A file that is not a PubMed set, malformed XML or a truncated/corrupt gzip stream ends the file
    with one ``ctx.skip``: records already yielded stand, nothing after the fault is trusted.
    """
    with open_binary(path) as fh:
        try:
            for item in safe_xml.EntryStream(fh, "PubMed", _ENTRY_TAGS, _ROOTS):
                if isinstance(item, safe_xml.Problem):
                    ctx.skip(item.reason, item.line)
                else:
                    yield from _entry(item, ctx)
        except etree.XMLSyntaxError as exc:
            ctx.skip(safe_xml.syntax_error_reason(exc), exc.lineno or None)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            ctx.skip(f"truncated or corrupt gzip: {exc}")


def _entry(elem: etree._Element, ctx: ReadContext) -> Iterator[Record | Deletion]:
    if elem.tag == "DeleteCitation":
        for pmid in elem.iterfind("PMID"):
            if pmid.text and pmid.text.strip():
                yield Deletion(pmid.text.strip(), pmid.sourceline)
        return
    if elem.tag == "PubmedBookArticle":
        meta, abstract = _book_fields(elem.find("BookDocument"))
    else:
        citation = elem if elem.tag == "MedlineCitation" else elem.find("MedlineCitation")
        meta, abstract = _citation_fields(citation, elem.find("PubmedData/ArticleIdList"))
    if not meta["pmid"]:
        ctx.skip("record without PMID", elem.sourceline)
        return
    text = "\n\n".join(part for part in (meta["title"], abstract) if part)
    if not text:
        ctx.skip("citation with neither title nor abstract", elem.sourceline)
        return
    yield Record(meta["pmid"], text, meta, elem.sourceline)


def _citation_fields(citation: etree._Element | None, pubmed_ids: etree._Element | None) -> tuple[dict[str, Any], str]:
    """Meta and abstract of a ``MedlineCitation`` (both DTDs share this layout)."""
    if citation is None:
        return {"pmid": None}, ""
    article = _find(citation, "Article")
    journal = _find(article, "Journal")
    abstract = _abstract(article.find("Abstract"))
    meta = {
        "pmid": _text(citation.find("PMID")),
        "title": _title(article.find("ArticleTitle")),
        "journal": _text(journal.find("Title")) or _text(citation.find("MedlineJournalInfo/MedlineTA")),
        "year": _year(
            journal.find("JournalIssue/PubDate"), article.find("ArticleDate"), citation.find("DateCompleted")
        ),
        "publication_types": _texts(article.iterfind("PublicationTypeList/PublicationType")),
        "mesh": _texts(citation.iterfind("MeshHeadingList/MeshHeading/DescriptorName")),
        "language": _texts(article.iterfind("Language")),
        "doi": _doi(article, pubmed_ids),
        "has_abstract": bool(abstract),
    }
    return meta, abstract


def _book_fields(doc: etree._Element | None) -> tuple[dict[str, Any], str]:
    """Meta and abstract of a ``BookDocument`` (NCBI Bookshelf chapters and books)."""
    if doc is None:
        return {"pmid": None}, ""
    book = _find(doc, "Book")
    abstract = _abstract(doc.find("Abstract"))
    meta = {
        "pmid": _text(doc.find("PMID")),
        "title": _title(doc.find("ArticleTitle")) or _title(book.find("BookTitle")),
        "journal": None,
        "year": _year(book.find("PubDate")),
        "publication_types": _texts(doc.iterfind("PublicationType")),
        "mesh": [],
        "language": _texts(doc.iterfind("Language")),
        "doi": _doi(doc, doc.find("ArticleIdList")),
        "has_abstract": bool(abstract),
    }
    return meta, abstract


def _find(elem: etree._Element, path: str) -> etree._Element:
    """``elem.find(path)``, or an empty element so that lookups below it simply find nothing."""
    found = elem.find(path)
    return _EMPTY if found is None else found


def _text(elem: etree._Element | None) -> str:
    """All text inside ``elem`` (inline markup included), whitespace runs collapsed to one space."""
    return "" if elem is None else " ".join(_inner_text(elem).split())


def _inner_text(elem: etree._Element) -> str:
    """The text of ``elem`` and its descendants; an exponent is written ``10^5``, a subscript stays ``CO2``."""
    parts = [elem.text or ""]
    for child in elem:
        if child.tag is etree.Entity:  # left unexpanded (see safe_xml): the HTML character it names
            text = safe_xml.entity_text(child)
        else:
            text = _inner_text(child) if isinstance(child.tag, str) else ""  # not a comment's text
        if child.tag == "sup" and is_exponent(parts, text):
            text = "^" + text
        parts += [text, child.tail or ""]
    return "".join(parts)


def is_exponent(before: list[str], sup: str) -> bool:
    """Whether superscript text ``sup`` is an exponent of the number ending the text ``"".join(before)``."""
    return bool(_EXPONENT.match(sup.lstrip()) and _NUMBER_BEFORE.search(_text_end(before)))


def _text_end(parts: list[str], size: int = 64) -> str:
    """The last ``size`` characters of ``"".join(parts).rstrip()``: all that :data:`_NUMBER_BEFORE` needs (the
    number's last two digits, or one and the two characters before it). Joining and searching the whole text
    at each superscript took time quadratic in its length: minutes for 100 kB of digits before a ``<sup>``."""
    kept, length = [], 0
    for part in reversed(parts):
        kept.append(part)
        length += len(part) if length else len(part.rstrip())
        if length >= size:
            break
    return "".join(reversed(kept)).rstrip()[-size:]


def _texts(elems: Iterator[etree._Element]) -> list[str]:
    return [text for text in map(_text, elems) if text]


def _title(elem: etree._Element | None) -> str:
    """The title, without the square brackets NLM puts around titles translated into English."""
    title = _text(elem)
    if title.startswith("["):
        depth = 0
        for i, char in enumerate(title):
            depth += (char == "[") - (char == "]")
            if depth == 0:  # the bracket opened at 0 closes here
                if title[i + 1 :] in ("", "."):
                    return title[1:i] + title[i + 1 :]
                break
    return title


def _abstract(abstract: etree._Element | None) -> str:
    """Abstract paragraphs separated by blank lines; structured ones keep their ``LABEL: `` prefix.

    ``UNLABELLED`` is NLM's placeholder for a paragraph without a label, not a label.
    """
    if abstract is None:
        return ""
    paragraphs = []
    for part in abstract.iterfind("AbstractText"):
        text = _text(part)
        label = (part.get("Label") or "").strip()
        if text:
            paragraphs.append(f"{label}: {text}" if label and label != "UNLABELLED" else text)
    return "\n\n".join(paragraphs)


def _year(*dates: etree._Element | None) -> int | None:
    """Year of the first date that has one; ``MedlineDate`` is free text such as ``1998 Dec-1999 Jan``."""
    for date in dates:
        if date is None:
            continue
        year = date.findtext("Year") or ""
        match = _YEAR.search(year) or _YEAR.search(date.findtext("MedlineDate") or "")
        if match:
            return int(match.group())
    return None


def _doi(article: etree._Element, pubmed_ids: etree._Element | None) -> str | None:
    for loc in article.iterfind("ELocationID"):
        if loc.get("EIdType") == "doi" and loc.get("ValidYN") != "N" and _text(loc):
            return _text(loc)
    if pubmed_ids is not None:
        for aid in pubmed_ids.iterfind("ArticleId"):
            if aid.get("IdType") == "doi" and _text(aid):
                return _text(aid)
    return None
