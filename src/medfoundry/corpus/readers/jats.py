"""Reader for JATS full-text articles (PMC open-access ``.nxml``, PLOS ``.xml``, ``<pmc-articleset>`` files).

The article is laid out as Markdown: ``# Title``, the main abstract, then the body with one heading
level per ``<sec>`` nesting level. References, acknowledgements, footnotes, table bodies,
supplementary material and inline bibliographic citations are removed: they are boilerplate or
noise for language-model pretraining.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from lxml import etree

from medfoundry.corpus.readers import safe_xml
from medfoundry.corpus.readers.base import ReadContext, Record
from medfoundry.corpus.readers.pubmed_xml import is_exponent
from medfoundry.io import open_binary

MML = "{http://www.w3.org/1998/Math/MathML}"
MATH_LEAVES = {f"{MML}mi", f"{MML}mo", f"{MML}mn", f"{MML}mtext", f"{MML}ms"}
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
CONTAINERS = {"fig-group", "table-wrap-group", "disp-quote", "boxed-text"}  # rendered as the blocks they hold
BLOCKS = {"list", "def-list", "fig", "table-wrap", "disp-formula", *CONTAINERS}

# Body sections that are publishing boilerplate rather than article text (whole-title match).
BOILERPLATE_SECTION = re.compile(
    r"acknowledge?ments?|competing interests?|conflicts? of interests?|authors?['’]? contributions?"
    r"|pre-publication history|funding( statement)?|disclosures?|supporting information"
    r"|supplementary (data|material|information)|additional (files?|material)|(list of )?abbreviations",
    re.IGNORECASE,
)

CITE = "\x00"  # placeholder for a removed bibliographic xref, resolved by _drop_citations
_SEP = r"[\s,;\-–—−]"
# "see", "see, e.g.,", "cf." before citations. Possessive (*+): the separators that follow are _SEP's, and trying
# every split of a long run of them between the two took time quadratic in its length.
_LEAD = r"(?:\b(?:see(?: also)?|e\.g\.|cf\.)[\s,]*+)*"
# Brackets holding only citations with separators, a lead-in or a locator: "[4]–[6]", "(see 1, 2)", "(12, p. 67)".
_CITE_GROUP = re.compile(rf"[\[(]\s*{_LEAD}{_SEP}*\x00(?:{_SEP}|and|&|\x00)*(?:,[^()\[\]\x00]{{0,40}})?[\])]")
_CITE_AFTER_OPEN = re.compile(rf"([\[(])\x00(?:{_SEP}*\x00)*{_SEP}*")  # "(12; Figure 2)" -> "(Figure 2)"
# A run of separators is only matched from its start ((?<!...)): searching from each of its characters took
# time quadratic in its length.
_CITE_RUN = re.compile(rf"(?<![\s,;])[\s,;]*{_LEAD}\x00(?:{_SEP}*\x00)*")  # "shown, see 3, 4–6." -> "shown."

# Inline formulas given only as an image are dropped: a run of them ("x, y, and z") goes with the space before
# it, and with a comma before it when punctuation follows; brackets holding nothing else go whole. So the
# sentence reads on without the symbol, instead of keeping "(, and )" or "data, , i.e." debris.
FORMULA = "\x01"  # placeholder for such a formula, resolved by _clean
_FORMULAS = r"\x01(?:(?:[\s,;]|and|or)*\x01)*"
_FORMULA_GROUP = re.compile(rf"\s*[\[(][\s=]*{_FORMULAS}[\s,;]*[\])]")  # "rate (x, y)." -> "rate."; "(= n)" too
_FORMULA_AFTER_OPEN = re.compile(rf"(?<=[\[(]){_FORMULAS}[\s,;]*")  # "(x of the rate)" -> "(of the rate)"
# "data, x, i.e." -> "data, i.e."; from the start of a run of separators only, as _CITE_RUN
_FORMULA_RUN = re.compile(rf"(?<![\s,;])[\s,;]*{_FORMULAS}(?=[,;.:)\]])|\s*{_FORMULAS}")
_SCRIPT_MARKS = re.compile(r"[*∗⋆′″‴†‡]+")  # superscripts written as they are: x′, n*
_SIMPLE_SCRIPT = re.compile(r"\S|[-+−]?[\w.]+|\(.*\)")  # written without brackets: x^2, 10^−5, D^(1), η^⊤

# Creative Commons licences by URL (".../licenses/by-nc/3.0/", ".../publicdomain/zero/1.0/") or by name
# ("Creative Commons Attribution-NonCommercial 4.0 International License", "CC BY 4.0").
_CC_URL = re.compile(r"creativecommons\.org/(?:licenses/([a-z-]+)/(\d\.\d)|publicdomain/(zero|mark)/1\.0)", re.I)
_CC_NAME = re.compile(
    r"\b(?:Creative Commons Attribution|CC[ -]BY)((?:[ -]+(?:Non-?Commercial|NC|Share-?Alike|SA|No-?Deriv\w*|ND)\b)*)"
    r"(?:[ -]+(?:Licen[cs]e[ ,]+)?(?:version )?(\d\.\d))?",
    re.I,
)
_CC_TERMS = {"NC": ("nc", "commercial"), "ND": ("nd", "deriv"), "SA": ("sa", "share")}


def read_jats(path: Path, ctx: ReadContext, captions: bool = True) -> Iterator[Record]:
    """Yield the article of a JATS file, or each ``<article>`` of a ``<pmc-articleset>`` (a ``<sub-article>``
    is part of its article); figure and table captions are kept when ``captions``.

    The file is streamed article by article (see :class:`safe_xml.EntryStream`): an article over the size limits
    is skipped and the next one read, and nothing else in the file is kept in memory."""
    stem = Path(Path(path).name.removesuffix(".gz")).stem
    try:
        with open_binary(path) as fh:
            stream = safe_xml.EntryStream(fh, "JATS", ("article",), ("pmc-articleset",))
            for item in stream:
                if isinstance(item, safe_xml.Problem):
                    ctx.skip(item.reason, item.line)
                    continue
                record = _record(item, captions, stem if item.getparent() is None else f"{stem}#{stream.started}")
                if record is None:
                    ctx.skip("no article text", item.sourceline)
                else:
                    yield record
    except etree.XMLSyntaxError as err:
        ctx.skip(safe_xml.syntax_error_reason(err), err.lineno)
        return
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        ctx.skip(f"truncated or corrupt gzip: {err}")
        return
    if not stream.started and not stream.refused:
        ctx.skip("no article text")


def _record(article: etree._Element, captions: bool, fallback_id: str) -> Record | None:
    """The record of one ``<article>``; ``fallback_id`` names it when it has neither PMCID nor DOI."""
    laid_out = _article_text(article, captions)
    if laid_out is None:
        return None
    text, section_titles = laid_out
    meta = {**_meta(article), "section_titles": section_titles}
    return Record(native_id=meta["pmcid"] or meta["doi"] or fallback_id, text=text, meta=meta, line=article.sourceline)


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
    if tag in CONTAINERS or tag in ("caption", "floats-group"):
        return _blocks(el, level, captions)
    if tag == "list":
        text = _list(el)
    elif tag == "def-list":
        text = _def_list(el)
    elif tag in ("fig", "table-wrap"):
        text = _caption(el) if captions else None
    else:  # a display formula is a paragraph of its own, or nothing when it is an image
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


def _def_list(el: etree._Element) -> str:
    """A definition list (glossaries are dropped, but the body may hold one): ``term: definition`` lines."""
    lines = [_inline(el.find("title"))]
    for item in el.iterfind("def-item"):
        term = _inline(item.find("term"))
        definition = " ".join(_inline(d) for d in item.iterfind("def"))
        lines.append(f"{term}: {definition}" if term and definition else term or definition)
    return "\n".join(line for line in lines if line)


def _caption(el: etree._Element) -> str | None:
    """``Figure 1. Caption title. Caption text`` from a figure or table's label and caption."""
    parts = [_inline(el.find("label")).rstrip(".:")]
    parts += [_inline(c) for c in el.iterfind("caption/*")]
    text = " ".join(p if p[-1] in ".!?:" else f"{p}." for p in parts if p)
    return text or None


# --- inline text ------------------------------------------------------------------------------


def _inline(el: etree._Element | None) -> str:
    """The element's text, with citations, footnotes and MathML markup removed."""
    return "" if el is None else _clean(_content(el))


def _content(el: etree._Element) -> str:
    """The text inside ``el`` (not its tail), before :func:`_clean`."""
    parts = [el.text or ""]
    for child in el:
        _collect(child, parts)
        parts.append(child.tail or "")
    return "".join(parts)


def _collect(el: etree._Element, parts: list[str]) -> None:
    """Append the text of ``el`` (not its tail) to ``parts``."""
    tag = el.tag
    if tag is etree.Entity:  # not resolved (no DTD is loaded): keep it if it is a known HTML entity
        parts.append(safe_xml.entity_text(el))
        return
    if tag == "disp-formula":  # a block, but in a list item or a caption it stays in the line
        parts.append(f" {_content(el)} ")
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
    text = _content(el)
    if tag == "sup" and CITE not in text and is_exponent(parts, text):
        text = "^" + text  # 10<sup>5</sup> is 10^5, not 105; a subscript stays plain (CO2)
    elif tag == "inline-formula" and not text.strip():
        text = FORMULA  # an image: see _clean
    parts.append(f" {text}" if tag in ("break", "hr") else text)


def _math_text(el: etree._Element) -> str:
    """The characters of a MathML formula, without the indentation between its elements. A superscript
    is written ``x^2``, ``10^−5``, ``e^(−x/2)``."""
    if el.tag in MATH_LEAVES:
        return (el.text or "").strip()
    if el.tag in DROPPED:
        return ""
    texts = [_math_text(child) for child in el]
    script = texts[-1] if texts and el.tag in (f"{MML}msup", f"{MML}msubsup") else ""
    if script and not _SCRIPT_MARKS.fullmatch(script):
        texts[-1] = f"^{script}" if _SIMPLE_SCRIPT.fullmatch(script) else f"^({script})"
    return "".join(texts)


def _clean(text: str) -> str:
    """Normalize whitespace; remove citation and image-formula placeholders with the brackets around them."""
    text = " ".join(text.split())
    if CITE in text:
        text = _drop_citations(text)
    if FORMULA in text:
        for pattern in (_FORMULA_GROUP, _FORMULA_AFTER_OPEN, _FORMULA_RUN):
            text = pattern.sub("", text)
    return text.strip()


MAX_CITATION_NESTING = 8  # bracket levels around citations removed; real text has two ("(see [4]–[6])")


def _drop_citations(text: str) -> str:
    for _ in range(MAX_CITATION_NESTING):  # innermost brackets first; not unbounded: each pass reads the whole
        text, n = _CITE_GROUP.subn(CITE, text)  # text, so 30,000 nested brackets took minutes
        if not n:
            break
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
        "year": int(year) if year.isdecimal() and len(year) <= 4 else None,  # int() refuses "²" and 4301 digits
        **_license(am),
        "article_type": article.get("article-type"),
    }


def _license(am: etree._Element) -> dict[str, str | None]:
    """``license``: the licence URL when one is given, else the licence text, else None; ``license_id``: its
    SPDX-like id (see :func:`_license_id`).

    Older PMC files have no ``<license>`` and state the licence in the copyright statement.
    """
    lic = am.find("permissions/license")
    url = am.findtext(f"permissions/{ALI}license_ref")
    if lic is not None:
        links = (e.get(XLINK_HREF) for e in lic.iter("ext-link"))
        url = lic.get(XLINK_HREF) or lic.get(RDF_RESOURCE) or url or next(filter(None, links), None)
    text = _inline(lic)
    if not text:
        statement = _inline(am.find(".//copyright-statement"))
        text = statement if re.search(r"licen[cs]e", statement, re.IGNORECASE) else ""
    url = (url or "").strip()
    if not (url or text):
        return {"license": None, "license_id": None}
    return {"license": url or text, "license_id": _license_id(f"{url} {text}")}


def _license_id(licence: str) -> str:
    """``CC-BY-4.0``, ``CC-BY-NC-ND-3.0``, ``CC0-1.0``... from a Creative Commons URL or name; ``CC-BY`` (no
    version) when the text names the licence without one, as older PLOS articles do; ``other`` otherwise."""
    url = _CC_URL.search(licence)
    if url:
        kind, version, public_domain = url.groups()
        if public_domain:
            return "CC0-1.0" if public_domain.lower() == "zero" else "CC-PDM-1.0"
        return f"CC-{kind.upper()}-{version}"
    if re.search(r"\bCC0\b|public domain dedication", licence, re.I):
        return "CC0-1.0"
    if re.search(r"Creative Commons Public Domain Declaration", licence, re.I):
        return "CC-PDDC"
    name = _CC_NAME.search(licence)
    if not name:
        return "other"
    terms = re.sub(r"[^a-z]", "", name.group(1).lower())
    flags = [flag for flag, marks in _CC_TERMS.items() if any(mark in terms for mark in marks)]
    return "-".join(["CC-BY", *flags, *filter(None, [name.group(2)])])
