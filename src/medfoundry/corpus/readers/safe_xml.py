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
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import IO, Any

from lxml import etree

PARSER_OPTIONS: dict[str, Any] = {
    "resolve_entities": False,
    "load_dtd": False,
    "no_network": True,
    "huge_tree": False,
    "dtd_validation": False,
    "attribute_defaults": False,
}


def parser() -> etree.XMLParser:
    """A fresh parser with :data:`PARSER_OPTIONS` (lxml parsers are not shared across threads)."""
    return etree.XMLParser(**PARSER_OPTIONS)


class iterparse:
    """``lxml.etree.iterparse(source, events, tag)`` with :data:`PARSER_OPTIONS`, that delivers every event parsed
    before a syntax error before raising it: lxml 6's iterparse raises at once, dropping the entries already
    parsed from the same block, so a lenient reader would lose the good records before the damage. ``root``
    is the document's root element once the whole source has been parsed."""

    def __init__(self, source: IO[bytes], events: tuple[str, ...], tag: Any = None, block: int = 1 << 16):
        self.source, self.block = source, block
        self.parser = etree.XMLPullParser(events=events, tag=tag, **PARSER_OPTIONS)
        self.root: etree._Element | None = None

    def __iter__(self) -> Iterator[tuple[str, etree._Element]]:
        while True:
            data = self.source.read(self.block)
            try:
                if data:
                    self.parser.feed(data)
                else:
                    self.root = self.parser.close()
            except etree.XMLSyntaxError:
                yield from self.parser.read_events()
                raise
            yield from self.parser.read_events()
            if not data:
                return


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
