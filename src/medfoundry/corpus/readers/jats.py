"""Reader for JATS full-text articles (PMC open-access ``.nxml``, PLOS ``.xml``): one article per file.

The article is laid out as Markdown: ``# Title``, the main abstract, then the body with one heading
level per ``<sec>`` nesting level. References, acknowledgements, footnotes, table bodies,
supplementary material and inline bibliographic citations are removed: they are boilerplate or
noise for language-model pretraining.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Iterator

from lxml import etree

from medfoundry.corpus.readers.base import ReadContext, Record
from medfoundry.io import open_binary

MML = "{http://www.w3.org/1998/Math/MathML}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
RDF_RESOURCE = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}resource"
ALI = "{http://www.niso.org/schemas/ali/1.0/}"

# Abstracts that are not the article's own abstract (author/editor summaries, teasers).
SECONDARY_ABSTRACTS = {
    "summary", "author-summary", "editor", "editors-summary", "editor-summary",
    "toc", "patient", "teaser", "precis", "graphical", "lay", "plain-language-summary",
}  # fmt: skip
# Elements dropped with their content wherever they occur (their tail text is kept).
DROPPED = {
    "fn", "fn-group", "ref-list", "ack", "glossary", "table-wrap-foot", "table", "graphic",
    "inline-graphic", "media", "supplementary-material", "object-id", "tex-math", "label",
    f"{MML}annotation", f"{MML}annotation-xml", etree.Comment, etree.ProcessingInstruction, etree.Entity,
}  # fmt: skip
# Cross-references to notes and affiliations that are dropped: their markers ("*", "a", "1") go too.
NOTE_REFS = {"fn", "table-fn", "aff", "corresp", "author-notes"}
# Block elements: they break a paragraph when found inside one.
BLOCKS = {"list", "fig", "fig-group", "table-wrap", "table-wrap-group", "disp-quote", "boxed-text", "def-list"}

# Body sections that are publishing boilerplate rather than article text (whole-title match).
BOILERPLATE_SECTION = re.compile(
    r"acknowledge?ments?|competing interests?|conflicts? of interests?|authors?['’]? contributions?"
    r"|pre-publication history|funding( statement)?|disclosures?|supporting information"
    r"|supplementary (data|material|information)|additional (files?|material)|(list of )?abbreviations",
    re.IGNORECASE,
)

CITE = "\x00"  # placeholder for a removed bibliographic xref, resolved by _drop_citations
_SEP = r"[\s,;\-–—−]"
_LEAD = r"(?:\b(?:see(?: also)?|e\.g\.|cf\.)[\s,]*)*"  # "see", "see, e.g.,", "cf." before citations
# Brackets holding only citations with separators, a lead-in or a locator: "[4]–[6]", "(see 1, 2)", "(12, p. 67)".
_CITE_GROUP = re.compile(
    rf"[\[(]\s*{_LEAD}{_SEP}*\x00(?:{_SEP}|and|&|\x00)*(?:,[^()\[\]\x00]{{0,40}})?[\])]"
)
_CITE_AFTER_OPEN = re.compile(rf"([\[(])\x00(?:{_SEP}*\x00)*{_SEP}*")  # "(12; Figure 2)" -> "(Figure 2)"
_CITE_RUN = re.compile(rf"[\s,;]*{_LEAD}\x00(?:{_SEP}*\x00)*")  # "shown, see 3, 4–6." -> "shown."

_PARSER = etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True, huge_tree=True)


def read_jats(path: Path, ctx: ReadContext, captions: bool = True) -> Iterator[Record]:
    """Yield the one article of a JATS file; figure and table captions are kept when ``captions``."""
    with open_binary(path) as fh:
        data = fh.read()
    if not data.strip():
        ctx.skip("empty file")
        return
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as err:
        ctx.skip(f"malformed XML: {err.msg}", err.lineno)
        return
    article = root if root.tag == "article" else root.find(".//article")
    laid_out = _article_text(article, captions) if article is not None else None
    if laid_out is None:
        ctx.skip("no article text", None)
        return
    text, section_titles = laid_out
    meta = {**_meta(article), "section_titles": section_titles}
    native_id = meta["pmcid"] or meta["doi"] or Path(Path(path).name.removesuffix(".gz")).stem
    yield Record(native_id=native_id, text=text, meta=meta, line=article.sourceline)


# --- layout -----------------------------------------------------------------------------------


def _article_text(article: etree._Element, captions: bool) -> tuple[str, list[str]] | None:
    """Title, main abstract and body as Markdown, with the top-level section titles.

    None when the article has neither an abstract nor body text.
    """
    blocks: list[str] = []
    abstract = _main_abstract(article)
    if abstract is not None:
        blocks += _abstract_blocks(abstract)
    section_titles = []
    for child in article.iterfind("body/*"):
        rendered = _blocks_of(child, 2, captions)
        if child.tag == "sec" and rendered and rendered[0].startswith("## "):
            section_titles.append(rendered[0][3:])
        blocks += rendered
    floats = article.find("floats-group")  # PMC may put figures and tables after the back matter
    if floats is not None and captions:
        blocks += _blocks(floats, 2, captions)
    if not blocks:
        return None
    title = _inline(article.find("front/article-meta/title-group/article-title"))
    return "\n\n".join(([f"# {title}"] if title else []) + blocks), section_titles


def _main_abstract(article: etree._Element) -> etree._Element | None:
    for abstract in article.iterfind("front/article-meta/abstract"):
        if abstract.get("abstract-type") not in SECONDARY_ABSTRACTS:
            return abstract
    return None


def _abstract_blocks(abstract: etree._Element) -> list[str]:
    """Paragraphs of the abstract; a structured abstract's section titles become ``Label: text``."""
    blocks: list[str] = []
    for child in abstract:
        if child.tag == "sec":
            label = _inline(child.find("title"))
            paragraphs = [b for c in child if c.tag != "title" for b in _blocks_of(c, 0, captions=False)]
            if label and paragraphs:
                paragraphs[0] = f"{label.rstrip(':.')}: {paragraphs[0]}"
            blocks += paragraphs
        elif child.tag != "title":
            blocks += _blocks_of(child, 0, captions=False)
    return blocks


def _blocks(container: etree._Element, level: int, captions: bool) -> list[str]:
    """Render the children of a block container; ``level`` is the heading level of its sections."""
    return [b for child in container for b in _blocks_of(child, level, captions)]


def _blocks_of(el: etree._Element, level: int, captions: bool) -> list[str]:
    """Render one block-level element as Markdown blocks (headings, paragraphs, lists, captions)."""
    tag = el.tag
    if tag in DROPPED:
        return []
    if tag == "sec":
        return _section(el, level, captions)
    if tag == "p":
        return _paragraph(el, level, captions)
    if tag == "list":
        return [_list(el)]
    if tag in ("fig", "table-wrap"):
        caption = _caption(el) if captions else None
        return [caption] if caption else []
    if tag in BLOCKS or tag in ("caption", "floats-group"):
        return _blocks(el, level, captions)
    text = _inline(el)
    return [text] if text else []


def _section(sec: etree._Element, level: int, captions: bool) -> list[str]:
    """A heading (none at level 0) and the section's content; nothing for empty or boilerplate ones."""
    title = _inline(sec.find("title"))
    if sec.get("sec-type") == "supplementary-material" or BOILERPLATE_SECTION.fullmatch(title.rstrip(".:")):
        return []
    content = [b for c in sec if c.tag != "title" for b in _blocks_of(c, level + 1, captions)]
    if not content or not title or level == 0:
        return content
    return [f"{'#' * level} {title}", *content]


def _paragraph(p: etree._Element, level: int, captions: bool) -> list[str]:
    """A ``<p>``, split into several blocks where it contains lists, figures or tables."""
    blocks: list[str] = []
    parts: list[str] = [p.text or ""]
    for child in p:
        if child.tag in BLOCKS:
            blocks.append(_clean("".join(parts)))
            blocks += _blocks_of(child, level, captions)
            parts = []
        else:
            _collect(child, parts)
        parts.append(child.tail or "")
    blocks.append(_clean("".join(parts)))
    return [b for b in blocks if b]


def _list(el: etree._Element, depth: int = 0) -> str:
    lines = []
    for item in el.iterfind("list-item"):
        text = " ".join(_inline(c) for c in item if c.tag not in ("list", "label"))
        lines.append(f"{'  ' * depth}- {text}")
        lines += [_list(sub, depth + 1) for sub in item.iterfind("list")]
    return "\n".join(lines)


def _caption(el: etree._Element) -> str | None:
    """``Figure 1. Caption title. Caption text`` from a figure or table's label and caption."""
    parts = [_inline(el.find("label")).rstrip(".:")]
    parts += [_inline(c) for c in el.iterfind("caption/*")]
    text = " ".join(p if p[-1] in ".!?:" else f"{p}." for p in parts if p)
    return text or None


# --- inline text ------------------------------------------------------------------------------


def _inline(el: etree._Element | None) -> str:
    """The element's text, with citations, footnotes and MathML markup removed."""
    if el is None:
        return ""
    parts = [el.text or ""]
    for child in el:
        _collect(child, parts)
        parts.append(child.tail or "")
    return _clean("".join(parts))


def _collect(el: etree._Element, parts: list[str]) -> None:
    """Append the text of ``el`` (not its tail) to ``parts``."""
    tag = el.tag
    if tag is etree.Entity:  # not resolved (no DTD is loaded): keep it if it is a known HTML entity
        text = html.unescape(el.text)
        parts.append(text if text != el.text else " ")
        return
    if tag in DROPPED or tag in BLOCKS:
        return
    if tag == "xref" and el.get("ref-type") in NOTE_REFS:
        return
    if tag == "xref" and el.get("ref-type") == "bibr":
        parts.append(CITE)
        return
    if tag == f"{MML}math":
        parts.append(_math_text(el))
        return
    if tag == "alternatives":  # the same content in several forms: keep the first textual one
        el = next((c for c in el if c.tag not in DROPPED), None)
        if el is not None:
            _collect(el, parts)
        return
    if tag in ("break", "hr"):
        parts.append(" ")
    parts.append(el.text or "")
    for child in el:
        _collect(child, parts)
        parts.append(child.tail or "")


def _math_text(math: etree._Element) -> str:
    """The characters of a MathML formula, without the indentation between its elements."""
    return "".join(
        (leaf.text or "").strip()
        for leaf in math.iter(f"{MML}mi", f"{MML}mo", f"{MML}mn", f"{MML}mtext", f"{MML}ms")
    )


def _clean(text: str) -> str:
    """Normalize whitespace and remove citation placeholders with the brackets around them."""
    text = " ".join(text.split())
    return _drop_citations(text).strip() if CITE in text else text.strip()


def _drop_citations(text: str) -> str:
    n = 1
    while n:  # innermost brackets first: "(see [4]–[6])"
        text, n = _CITE_GROUP.subn(CITE, text)
    return _CITE_RUN.sub("", _CITE_AFTER_OPEN.sub(r"\1", text))


# --- metadata ---------------------------------------------------------------------------------


def _meta(article: etree._Element) -> dict:
    am = article.find("front/article-meta")
    if am is None:
        am = etree.Element("article-meta")
    ids = {i.get("pub-id-type"): (i.text or "").strip() for i in am.iterfind("article-id")}
    pmcid = ids.get("pmc") or ids.get("pmcid")
    if pmcid and not pmcid.upper().startswith("PMC"):
        pmcid = f"PMC{pmcid}"
    year = (am.findtext("pub-date/year") or "").strip()
    journal = article.find("front/journal-meta//journal-title")
    if journal is None:  # some PLOS files only carry the NLM abbreviation
        journal = article.find("front/journal-meta/journal-id[@journal-id-type='nlm-ta']")
    return {
        "pmid": ids.get("pmid") or None,
        "pmcid": pmcid or None,
        "doi": ids.get("doi") or None,
        "title": _inline(am.find("title-group/article-title")) or None,
        "journal": _inline(journal) or None,
        "year": int(year) if year.isdigit() else None,
        "license": _license(am),
        "article_type": article.get("article-type"),
    }


def _license(am: etree._Element) -> str | None:
    """The licence URL when one is given, else the licence text, else None.

    Older PMC files have no ``<license>`` and state the licence in the copyright statement.
    """
    lic = am.find("permissions/license")
    url = am.findtext(f"permissions/{ALI}license_ref")
    if lic is not None:
        links = (e.get(XLINK_HREF) for e in lic.iter("ext-link"))
        url = lic.get(XLINK_HREF) or lic.get(RDF_RESOURCE) or url or next(filter(None, links), None)
    if url:
        return url.strip()
    text = _inline(lic)
    if not text:
        statement = _inline(am.find(".//copyright-statement"))
        text = statement if re.search(r"licen[cs]e", statement, re.IGNORECASE) else ""
    return text or None
