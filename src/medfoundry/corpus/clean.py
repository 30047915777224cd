"""Text normalization and document quality filtering.

Both run on every document of the corpus, so each step is one precompiled regex pass (C speed)
and language identification looks only at a bounded prefix.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata

from medfoundry.corpus.config import CleanConfig
from medfoundry.errors import ConfigError

# Control characters except \t and \n, plus invisible ones that split words (BOM, ZWSP, soft hyphen).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\ufeff]")
_NEWLINE = re.compile(r"\r\n?")
# C1 controls (U+0080-U+009F) in real text are bytes mis-decoded as Latin-1. UTF-8 read that way turns "—"
# into "â\x80\x94": such sequences are decoded back. A lone one is most often Windows-1252 punctuation
# ("1\x964" for "1–4") and is mapped to it. Other mojibake (without C1 controls) is left alone.
_LATIN1_MOJIBAKE = re.compile(r"[\xc2-\xf4](?=[\x80-\xbf]{0,2}[\x80-\x9f])[\x80-\xbf]{1,3}")
_C1_AS_CP1252 = {c: bytes([c]).decode("cp1252", errors="ignore") or None for c in range(0x80, 0xA0)}
# Character references left by badly converted sources: "&lt;", "&quot;", doubly escaped "&amp;emsp14;", and the
# ISO 8879 Greek names of SGML-era records ("&bgr;" β, "&Dgr;" Δ). "&NA;" stands for a missing section title and
# becomes a paragraph break. Only the ";"-terminated form is decoded, so "SK&F" or "R&D" stay; unknown names stay.
_ENTITY = re.compile(r"&(?:amp;)?(#\d+|#x[\da-fA-F]+|[A-Za-z][A-Za-z\d]*);")
_ISO_GREEK = dict(
    zip(
        [
            "a",
            "b",
            "g",
            "d",
            "e",
            "z",
            "ee",
            "th",
            "i",
            "k",
            "l",
            "m",
            "n",
            "x",
            "o",
            "p",
            "r",
            "s",
            "sf",
            "t",
            "u",
            "ph",
            "kh",
            "ps",
            "oh",
        ],
        "αβγδεζηθικλμνξοπρσςτυφχψω",
    )
)
_NAMED_ENTITIES = {
    **{f"{name}gr": letter for name, letter in _ISO_GREEK.items()},
    **{f"{name.upper()}gr": letter.upper() for name, letter in _ISO_GREEK.items()},
    "NA": "\n\n",
}
# Attribute debris of badly flattened XML: `xmlns:ns0="http://www.w3.org/1999/xlink">` and `id="Par1">` after a
# section label. An attribute is only taken when it closes its tag (`">`), so quoted text stays; an xmlns
# declaration is taken anyway (`xmlns:ns0="..." id="Par4">` loses both attributes).
_XML_DEBRIS = re.compile(r'\b[\w:-]+="[^"\n]*">|xmlns(?::\w+)?="[^"\n]*"')
# NLM's placeholder label for an abstract paragraph without a label, at the start of a line or after a sentence
# (abstracts whose paragraphs were joined into one line): "UNLABELLED: The", ". UNLABELLED Although".
_UNLABELLED = re.compile(r"(?:^|(?<=[.!?] ))UNLABELLED ?:? ?", re.MULTILINE)

# Removal patterns start with a literal where possible: re then scans for it at C speed, while a
# leading optional part (such as the space before the match) makes it try every position, 20x slower.
# The space a removal leaves before punctuation is dropped afterwards by _SPACE_BEFORE_PUNCT.

# A URL ends before trailing sentence punctuation. Lower-case schemes only, for the speed above.
_URL = re.compile(r"""(?:https?://|www\.)[^\s<>"]*[^\s<>".,;:!?)\]'}]""")
# Numeric citation markers: [1], [2, 3], [4–6], [1-3,7]. They follow a space or punctuation and are not
# followed by a word character or hyphen, so PTHrP[1-34] and [1,2]-Wittig stay; brackets holding
# anything but numbers ([Ca2+], [18F]FDG, [95% CI 1.2-3.4]) never match. The lookbehind sits after
# the "[" so that re still scans for the literal.
_BRACKET_REF = re.compile(r"\[(?<![^\s.,;]\[)\s*\d{1,4}(?:\s*[-–—,;]\s*\d{1,4})*\s*\](?![\w-])")
# ...unless a number, maybe with a short unit, comes just before: "median 36 [11-83]", "56 yr [36-69]",
# "5580 pmol/L [4320-6786]" are ranges and SDs, not citations.
_AFTER_NUMBER = re.compile(r"\d%?(?: [^\s\d()\[\]]{1,6})? ?$")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")  # what "(https://...)" leaves behind

# Publisher notices. A notice starts a sentence (or follows a closing citation like "6477-89."), so the
# © of "Zocor©" is not one. A ©, "(c)" or "Copyright" notice needs a year, maybe after the holder ("© Joanna
# Moncrieff 2013"), that is not followed by a lower-case word ("(c) 2005 births" is item (c) of a list), or a
# publisher's name ("Copyright Academic Press."): "the Copyright Office registers" is not one. "Published" needs
# a publisher ("Published 2001 Wiley-Liss", not "Published 2019 data from").
_YEAR = r"(?:19|20)\d\d\b(?=\s*(?:by\b|[^\sa-z\d]|$))"
_PUBLISHER = (
    r"(?:The Authors?|Elsevier|(?:John )?Wiley|Springer|Academic Press|Oxford University Press|BMJ"
    r"|This article is a U\.?S\.? Government work)\b"
)
_NOTICE_START = (
    r"(?<![^\s.;:)\]])(?:"
    rf"(?:[Cc]opyright\b\s*(?:©|\(c\)|\ufffd)?|©)\s*(?:(?:[A-Z][\w.'-]*,? ){{0,4}}{_YEAR}|{_PUBLISHER})"
    rf"|(?:\(c\)|\ufffd)\s*{_YEAR}"  # U+FFFD: a © mangled by a bad decode
    rf"|Published (?:{_YEAR}\.? )?(?:by )?{_PUBLISHER}"
    r")"
)
# A new sentence of running text on the line: a capitalized word, then a lower-case word that is not a
# title's "of", "and"...
_PROSE_SENTENCE = r"[.!?][ \t]+[A-Z][a-z]*[ \t]+(?!(?:and|of|in|for|the|on|by|published)\b)[a-z]{3,}"
# A notice that reaches the end of its line within 200 characters, with no running text after it, is the
# trailing notice of an abstract and goes whole ("Copyright 2001 S. Karger AG, Basel", "© 2015 The Authors.
# X published by John Wiley & Sons Ltd on behalf of Y."); otherwise only its own sentence goes.
_NOTICE = re.compile(
    r"\(PsycINFO Database Record [^()\n]*(?:\([^()\n]*\)[^()\n]*)*\)\.?"
    rf"|{_NOTICE_START}(?:(?:(?!{_PROSE_SENTENCE})[^\n]){{0,200}}$|[^\n]{{0,150}}?[.!?](?=\s+[A-Z]|\s*$))"
    r"|(?:This article is protected by copyright\.\s*)?All rights reserved\.?"
    r"|This article is protected by copyright\.?"
    r"|\(ABSTRACT TRUNCATED(?: AT \d+ WORDS)?\)\.?"
    r"|ELECTRONIC SUPPLEMENTARY MATERIAL:[^\n]{0,300}$"
    r"|Please see later in the article for the Editors' Summary\.?",
    re.MULTILINE,
)
# _NOTICE has no literal prefix, so it only runs on the ~2% of texts holding one of these.
_NOTICE_HINTS = (
    "©",
    "\ufffd",
    "(c)",
    "opyright",
    "Published",
    "rights reserved",
    "TRUNCATED",
    "SUPPLEMENTARY",
    "Editors' Summary",
)

_SPACE_BEFORE_PUNCT = re.compile(r" (?=[.,;!?](?:\s|$))")  # not ":", ratios are written "1 : 3"
_BLANK_LINES = re.compile(r"\n\n\n+")


class TextCleaner:
    """Normalizes one document's text according to a :class:`CleanConfig`."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg

    def clean(self, text: str) -> str:
        cfg = self.cfg
        text = _NEWLINE.sub("\n", text)
        if "&" in text:
            text = _ENTITY.sub(_decode_entity, text)
        if _CONTROL.search(text):
            text = _LATIN1_MOJIBAKE.sub(_undo_latin1, text).translate(_C1_AS_CP1252)
            text = _CONTROL.sub("", text)
        if cfg.unicode_form != "none":
            text = unicodedata.normalize(cfg.unicode_form, text)
        if '="' in text:
            text = _XML_DEBRIS.sub("", text)
        if "UNLABELLED" in text:
            text = _UNLABELLED.sub("", text)
        if cfg.remove_urls:
            text = _EMPTY_PARENS.sub("", _URL.sub("", text))
        if cfg.remove_boilerplate and any(hint in text for hint in _NOTICE_HINTS):
            text = _NOTICE.sub("", text)
        if cfg.remove_bracket_refs:
            text = _BRACKET_REF.sub(_drop_citation, text)
        return _normalize_whitespace(text)


def _decode_entity(match: re.Match) -> str:
    name = match.group(1)
    return _NAMED_ENTITIES.get(name) or html.unescape(f"&{name};")


def _undo_latin1(match: re.Match) -> str:
    try:
        return match.group().encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return match.group()


def _drop_citation(match: re.Match) -> str:
    before = match.string[max(0, match.start() - 12) : match.start()]
    return match.group() if _AFTER_NUMBER.search(before) else ""


def _normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs (tabs, NBSP, thin spaces ...) to one space, strip both ends of every
    line, keep at most one blank line between paragraphs. str.split beats a regex here by 4x."""
    text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
    text = _SPACE_BEFORE_PUNCT.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


LANGID_PREFIX = 500
"""Characters given to the language identifier: its cost is a Python loop over bytes (~160 us for 500),
and 500 characters classify every abstract of the reference corpus the same way as 1,000."""

_ENGLISH_WORDS = frozenset(["the", "and", "of", "to", "with", "for", "were", "that", "by", "are", "this", "from"])


def _clearly_english(prefix: str) -> bool:
    """At least 12% of the words are English function words. Such a prefix is English to py3langid as
    well (no disagreement on the 27,549 reference abstracts and replay texts; 95% of them pass this),
    and the check costs a twentieth of it."""
    words = prefix.lower().split()
    return bool(words) and sum(w in _ENGLISH_WORDS for w in words) >= 0.12 * len(words)


@functools.cache
def _language_identifier():
    """py3langid's bundled model (read from the installed package, no network), loaded once per process
    and kept out of QualityFilter so that pickling a filter for a worker does not copy its 70 MB."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class QualityFilter:
    """Decides whether a cleaned document is kept.

    ``check`` returns None to keep it, else ``(reason, detail)``; reasons are stable strings,
    counted in the build report: ``empty``, ``too_short``, ``too_long``, ``too_few_words``,
    ``not_english``.
    """

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        if cfg.language and cfg.language not in _language_identifier().nb_classes:
            raise ConfigError(f"clean.language {cfg.language!r} is not a language py3langid knows")

    def check(self, text: str) -> tuple[str, str] | None:
        cfg = self.cfg
        chars = len(text)
        if not text.strip():
            return "empty", "no text after cleaning"
        if chars < cfg.min_chars:
            return "too_short", f"chars={chars} < {cfg.min_chars}"
        if chars > cfg.max_chars:
            return "too_long", f"chars={chars} > {cfg.max_chars}"
        if cfg.min_words:
            n_words = len(text.split())
            if n_words < cfg.min_words:
                return "too_few_words", f"words={n_words} < {cfg.min_words}"
        if cfg.language:
            prefix = text[:LANGID_PREFIX]
            if cfg.language == "en" and _clearly_english(prefix):
                return None
            lang, prob = _language_identifier().classify(prefix)
            if lang != cfg.language and prob >= cfg.language_threshold:
                return "not_english", f"lang={lang} p={prob:.2f}"
        return None
