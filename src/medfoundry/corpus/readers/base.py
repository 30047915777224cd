"""The contract every source reader follows.

A reader is a function ``read(path, ctx, **options) -> Iterator[Record | Deletion]``. It streams
the file (constant memory whatever its size) and, when something is wrong with the input, calls
``ctx.skip(...)``: in strict mode that raises :class:`InputError` naming file and line; in lenient
mode it records the skip (which ends up in the corpus report) and the reader carries on with the
next record, or stops reading the file when nothing after the fault can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfoundry.errors import InputError


@dataclass(slots=True)
class Record:
    """One document as parsed from a source file.

    native_id: the source's own identifier (PMID, PMCID/DOI, guideline id, a JSONL field) or None.
    text: the document text, already laid out (title, headings, paragraphs) but not yet cleaned.
    meta: source metadata kept in the output (pmid, title, journal, year, licence, ...).
    line: 1-based line in the file where the record starts, when the format has lines.
    """

    native_id: str | None
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass(slots=True)
class Deletion:
    """A PubMed ``DeleteCitation`` entry: the PMID must not appear in the corpus."""

    pmid: str
    line: int | None = None


@dataclass(slots=True)
class Skip:
    path: str
    line: int | None
    reason: str


@dataclass
class ReadContext:
    """Error policy for one file: strict raises, lenient records every skip."""

    path: Path
    strict: bool = True
    skips: list[Skip] = field(default_factory=list)

    def skip(self, reason: str, line: int | None = None) -> None:
        if self.strict:
            raise InputError(str(self.path), reason, line)
        self.skips.append(Skip(str(self.path), line, reason))
