"""The one way medfoundry parses XML from outside: no entity expansion, no DTD, no network.

Every XML reader (PubMed, JATS) parses with :data:`PARSER_OPTIONS`:

- ``resolve_entities=False``: an entity reference stays an :class:`lxml.etree._Entity` node and is
  never replaced by its text, so a billion-laughs or quadratic-blowup document cannot grow in memory;
- ``load_dtd=False``, ``no_network=True``: neither the DOCTYPE's DTD nor an external entity is ever
  read, from disk or from the network (no XXE file disclosure, no server-side request);
- ``huge_tree=False``: libxml2's safety limits stay on (nesting depth 256, 10 MB per text node), which
  also keeps the readers' recursive layout code far from Python's recursion limit.

On top of that, a document whose internal DTD subset *declares* entities (``<!DOCTYPE x [<!ENTITY
...>]>``) is refused as a whole (:func:`entity_refusal`): real PubMed and JATS files never declare
any (they name the published DTD instead), so a declaration is either an attack or a file that
could only be read correctly by expanding it.

Documents are streamed entry by entry (:class:`EntryStream`), in memory bounded whatever they hold: an entry
over the limits of :mod:`medfoundry.limits`, or anything between the entries, is freed as it is parsed and
reported, and a document whose root is not of the expected kind is refused.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from lxml import etree

from medfoundry import limits

PARSER_OPTIONS: dict[str, Any] = {
    "resolve_entities": False,
    "load_dtd": False,
    "no_network": True,
    "huge_tree": False,
    "dtd_validation": False,
    "attribute_defaults": False,
    "remove_comments": True,  # nodes no reader needs: a document of millions of comments builds nothing
    "remove_pis": True,
}
BLOCK = 1 << 16  # bytes fed to the parser at a time


@dataclass(frozen=True)
class Problem:
    """Something wrong with a document that :class:`EntryStream` met, for the reader to report (``ctx.skip``)."""

    reason: str
    line: int | None = None


class EntryStream:
    """The entries of an XML document (``PubmedArticle``..., JATS ``article``), parsed incrementally with
    :data:`PARSER_OPTIONS` in memory bounded whatever the document holds.

    Iterating yields each complete entry element (freed once the next item is asked for), and a
    :class:`Problem` for:

    - an empty document, a root element that is neither one of ``roots`` nor an entry (an HTML page saved as
      ``.xml``), or entities declared in the DOCTYPE (see :func:`entity_refusal`): nothing more is read;
    - an entry over :data:`~medfoundry.limits.MAX_ENTRY_BYTES` or :data:`~medfoundry.limits.MAX_ENTRY_MARKUP`, as
      soon as it is over: its content is freed as it is parsed, and reading goes on after it;
    - the first element of a ``roots`` set that is not an entry: the set holds nothing else, so it is reported
      once; it and everything else outside the entries is freed as parsed.

    lxml's iterparse keeps every node it builds, and only the entries are ever seen (the events are filtered
    to their tags, which keeps parsing fast): so after each block of input, every node the parser has finished
    on the path down to the node being parsed is deleted, except inside an entry being read. A syntax error
    is raised after the events parsed before it: raising at once would drop the good entries of the same block.
    """

    def __init__(self, source: IO[bytes], kind: str, entries: tuple[str, ...], roots: tuple[str, ...]):
        self.source, self.kind, self.entries, self.roots = source, kind, entries, roots
        self.parser = etree.XMLPullParser(events=("start", "end"), tag=(*roots, *entries), **PARSER_OPTIONS)
        self.sniffer: etree.XMLPullParser | None = etree.XMLPullParser(events=("start",), **PARSER_OPTIONS)
        self.root: etree._Element | None = None  # the document's root, from the first event
        self.open: etree._Element | None = None  # the entry being parsed
        self.oversized = False  # whether the open entry is over a limit (reported; pruned like the rest)
        self.fed = self.markup = 0  # XML bytes, and '<', '&', '=' in them, fed so far
        self.start = (0, 0)  # self.fed and self.markup before the block where the open entry starts
        self.strays = False  # whether an element outside the entries was reported
        self.blank = True  # whether all bytes so far are whitespace
        self.started = 0  # entries whose start tag was parsed
        self.refused = False  # whether the document was refused as a whole (empty, wrong root, entities)
        self.done = False  # the document is parsed, or refused

    def __iter__(self) -> Iterator[etree._Element | Problem]:
        while not self.done:
            before = (self.fed, self.markup)
            data = self._read()
            if not data and self.blank:
                yield self._refuse(Problem("empty file"))
                return
            try:
                self.parser.feed(data) if data else self.parser.close()
            except etree.XMLSyntaxError:
                yield from self._block(data, before)
                if not self.done:
                    raise
                return
            yield from self._block(data, before)
            self.done = self.done or not data

    def _read(self) -> bytes:
        data = self.source.read(BLOCK)
        self.fed += len(data)
        self.markup += data.count(b"<") + data.count(b"&") + data.count(b"=")
        self.blank = self.blank and not data.strip()
        return data

    def _block(self, data: bytes, before: tuple[int, int]) -> Iterator[etree._Element | Problem]:
        """What the block of input just parsed brought (a wrong root, or entries and problems); then free what the
        parser has finished. ``before``: the bytes and markup fed before it."""
        wrong = self._wrong_root(data)  # checked on a syntax error too: an HTML page is seldom well-formed XML
        if wrong is not None:
            yield self._refuse(wrong)
            return
        yield from self._events(before)
        if not self.done:
            yield from self._prune(final=not data)

    def _refuse(self, problem: Problem) -> Problem:
        self.refused = self.done = True
        return problem

    def _wrong_root(self, data: bytes) -> Problem | None:
        """A problem when the root element is neither one of the roots nor an entry. The main parser reports no
        event for such a root: a second one, seeing every start tag, is fed until it has seen the root's."""
        sniffer = self.sniffer
        if sniffer is None:
            return None
        try:
            sniffer.feed(data) if data else sniffer.close()
        except etree.XMLSyntaxError:
            self.sniffer = None  # the main parser reports the error
        root = next((elem for _, elem in sniffer.read_events()), None)
        if root is None:
            return None
        self.sniffer = None
        if root.tag in self.roots or root.tag in self.entries:
            return None
        expected = " or ".join(f"<{tag}>" for tag in self.roots)
        return Problem(f"not a {self.kind} file: its root element is <{root.tag}>, not {expected}", root.sourceline)

    def _events(self, before: tuple[int, int]) -> Iterator[etree._Element | Problem]:
        """The entries that ended in the block just parsed, and problems."""
        for event, elem in self.parser.read_events():
            if self.root is None:  # the DOCTYPE is parsed before the first element: refuse before any entry
                self.root = elem.getroottree().getroot()
                names = declared_entities(self.root)
                if names:
                    yield self._refuse(Problem(entity_refusal(names), 1))
                    return
            if event == "start":
                if self.open is None and elem.tag in self.entries:
                    self.open, self.start, self.oversized = elem, before, False
                    self.started += 1
            elif elem is self.open:  # not an entry tag nested in the open entry, nor the root's end
                self.open = None
                if not self.oversized:
                    yield self._over_limit(elem) or elem
                elem.clear(keep_tail=True)  # the parser may still be adding to the text after it
        if self.open is not None and not self.oversized:
            over = self._over_limit(self.open)
            if over is not None:
                self.oversized = True
                yield over

    def _over_limit(self, entry: etree._Element) -> Problem | None:
        """A problem when the open entry spans more than the limits (counted from the start of the block where it
        starts: an overestimate by at most one block)."""
        size, markup = self.fed - self.start[0], self.markup - self.start[1]
        if size > limits.MAX_ENTRY_BYTES:
            what = f"more than {limits.mib(limits.MAX_ENTRY_BYTES)} of XML (medfoundry.limits.MAX_ENTRY_BYTES)"
        elif markup > limits.MAX_ENTRY_MARKUP:
            what = (
                f"more than {limits.MAX_ENTRY_MARKUP:,} tags, attributes and entity references "
                "(medfoundry.limits.MAX_ENTRY_MARKUP)"
            )
        else:
            return None
        return Problem(
            f"<{entry.tag}> entry with {what}: refused, its content freed as it was parsed", entry.sourceline
        )

    def _prune(self, final: bool) -> Iterator[Problem]:
        """Delete what the parser has finished, down the path to the node it is in: at each level every child but
        the last (which may be unfinished: deleting it would pull its text from under the parser), or all of them
        once the document is parsed (``final``). An entry being read is left whole."""
        keep = 0 if final else 1
        node = self.root
        while node is not None and len(node) and (node is not self.open or self.oversized):
            done = len(node) - keep
            if node is self.root and node.tag in self.roots and not self.strays:
                yield from self._strays(node, done)
            last = node[-1]
            del node[:done]
            node = last if keep else None

    def _strays(self, root: etree._Element, done: int) -> Iterator[Problem]:
        """The first of the root's first ``done`` children that is not an entry: reported once per document."""
        entries = sum(1 for _ in root.iterchildren(*self.entries))
        if done < len(root) and root[-1].tag in self.entries:
            entries -= 1
        if entries == done:
            return
        self.strays = True
        stray = next(child for child in root[:done] if child.tag not in self.entries)
        name = f"<{stray.tag}>" if isinstance(stray.tag, str) else str(stray)
        yield Problem(
            f"unexpected {name} in <{root.tag}>, which holds only {', '.join(f'<{t}>' for t in self.entries)}: "
            "ignored, with everything else outside them",
            stray.sourceline,
        )


def declared_entities(node: etree._Element | etree._ElementTree | None) -> list[str]:
    """Names of the entities (general and parameter) declared in the document's internal DTD subset."""
    if node is None:
        return []
    tree = node if isinstance(node, etree._ElementTree) else node.getroottree()
    dtd = tree.docinfo.internalDTD
    if dtd is None:
        return []
    return [entity.name for entity in dtd.iterentities()]


def entity_refusal(names: list[str]) -> str:
    """The reason given when a document declares entities."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"document declares XML entities ({shown}) in its DOCTYPE: refused, because expanding them is how "
        "billion-laughs and external-entity (XXE) attacks work, and PubMed/JATS files never declare any"
    )


def entity_text(entity: etree._Entity) -> str:
    """The text for an entity reference left unexpanded: the character of a known HTML entity (``&ndash;``, which
    real files use without their DTD), else a space."""
    text = html.unescape(entity.text)
    return text if text != entity.text else " "


def syntax_error_reason(error: etree.XMLSyntaxError) -> str:
    """The reason given for a parse error. Even unexpanded, an entity's content is checked once when it is first
    referenced, so libxml2 may stop a billion-laughs document itself: that is a refusal, not just bad XML."""
    message = error.msg or str(error)
    if "amplification" in message or "entity reference loop" in message.lower():
        return (
            f"refused: its entities would expand enormously, as in a billion-laughs or quadratic-blowup "
            f"attack ({message})"
        )
    return f"malformed XML: {message}"
