"""Size limits on untrusted input, in one place.

A reader meeting input over one of these limits refuses it (strict mode: an :class:`~medfoundry.errors.InputError`
naming the file and line) or skips it and records why (lenient mode), in bounded memory: it never holds the
oversized thing whole. Without them a 39 KB ``.xml.gz`` of empty elements, or a 2 GB line, got the process
killed for want of memory, which lenient mode cannot record as a skip. Each limit is far above what real data
needs; the messages name the constant, so that a user with a genuine outlier knows what to change.
"""

from __future__ import annotations

# One entry of a PubMed file (PubmedArticle...) or one JATS <article>: decompressed XML bytes, and markup (the
# '<', '&' and '=' that start each element, comment, entity reference and attribute: every node the parser
# builds). A real PubMed entry has at most a few thousand tags (~1 MB with a 15,000-name investigator list), a
# large PMC article some 100,000 (~17 bytes of XML each); a million costs at most ~200 MB of parsed tree.
MAX_ENTRY_BYTES = 32 << 20
MAX_ENTRY_MARKUP = 1_000_000
# One line of a JSONL or text file (a corpus document, an SFT or evaluation record): read in chunks, never whole.
MAX_LINE_BYTES = 32 << 20
# The text of one row of a Parquet file or Arrow dataset (its string columns read): the bound of a JSONL line, so
# that a record refused in one format is refused in the other.
MAX_ROW_BYTES = MAX_LINE_BYTES
# A plain-text corpus document (.txt / .txt.gz), which is one file read whole.
MAX_TEXT_FILE_BYTES = 32 << 20
# A whole-file JSON array or object (SFT .json / .json.gz), which is parsed in memory: its text takes one to four
# times this. Larger data sets stream as JSONL (one record per line) instead.
MAX_JSON_FILE_BYTES = 256 << 20


def mib(size: int) -> str:
    """``size`` bytes in MiB, for messages."""
    return f"{size / (1 << 20):g} MiB"
