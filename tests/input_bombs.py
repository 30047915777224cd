"""Oversized and mislabelled inputs for the input limits (``medfoundry.limits``), and a reader run in a child
process that reports its peak memory. Used by ``test_input_limits.py`` and by the ``fuzz`` group of
``benchmarks/reliability_report.py``.

Node bombs are written streaming, gzip level 1, from a repeated ``<a/>``: 10⁸ elements are a 400 MB document in a
~400 KB file. A huge line costs nothing to make: the start of a JSON line, then ``truncate`` to the size wanted
(the zero bytes read as one line), in a sparse file.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ABSTRACT = (
    "Hypertension is the leading modifiable risk factor for stroke. In this cohort of adults followed for "
    "ten years, each increase of blood pressure was associated with a higher incidence of stroke, and the "
    "association held after adjustment for age, diabetes and smoking."
)
PAPER = (
    "Resistance of Plasmodium falciparum to artemisinin spreads in Southeast Asia. We sequenced parasites "
    "from patients treated with artesunate and found kelch13 mutations in most isolates with delayed clearance."
)
BOMB = b"<a/>"


def pubmed_entry(pmid: str, inner: str = "") -> str:
    """A ``PubmedArticle``; ``inner`` goes inside its ``Article`` (where the bomb is planted)."""
    return (
        f"<PubmedArticle><MedlineCitation><PMID>{pmid}</PMID><Article><ArticleTitle>Blood pressure and stroke "
        f"{pmid}</ArticleTitle><Abstract><AbstractText>{ABSTRACT}</AbstractText></Abstract>{inner}</Article>"
        "</MedlineCitation></PubmedArticle>\n"
    )


def jats_article(pmcid: str, inner: str = "") -> str:
    """A JATS ``article``; ``inner`` goes inside its body's paragraph."""
    return (
        f'<article><front><article-meta><article-id pub-id-type="pmc">{pmcid}</article-id><title-group>'
        f"<article-title>Drug resistance in malaria {pmcid}</article-title></title-group></article-meta></front>"
        f"<body><sec><title>Results</title><p>{PAPER}{inner}</p></sec></body></article>\n"
    )


SHAPES = {  # kind -> (root, entry maker, good ids)
    "pubmed": ("PubmedArticleSet", pubmed_entry, ("1", "3")),
    "jats": ("pmc-articleset", jats_article, ("PMC1", "PMC3")),
}


def node_bomb(path: Path, kind: str, shape: str, elements: int, ids: tuple[str, str, str] | None = None) -> Path:
    """A PubMed or JATS set: a good entry, then ``elements`` empty elements (``shape`` "entry": inside a second
    entry; "siblings": between the entries), then a good entry. ``ids``: of the three entries (default: 1, 2, 3
    or PMC1, PMC2, PMC3). Gzipped (level 1) when ``path`` ends with ``.gz``."""
    root, entry, _ = SHAPES[kind]
    first, middle, last = ids or tuple(f"{'PMC' if kind == 'jats' else ''}{n}" for n in (1, 2, 3))
    before, after = f"<{root}>\n{entry(first)}", f"{entry(last)}</{root}>\n"
    if shape == "entry":
        opened, closed = entry(middle, "\x00").split("\x00")
        before, after = before + opened, closed + after
    with gzip.open(path, "wb", compresslevel=1) if path.suffix == ".gz" else open(path, "wb") as fh:
        fh.write(before.encode())
        chunk = BOMB * 100_000
        for _ in range(elements // 100_000):
            fh.write(chunk)
        fh.write(BOMB * (elements % 100_000))
        fh.write(after.encode())
    return path


def huge_line(path: Path, size: int, first: bytes, last: bytes) -> Path:
    """A sparse file: ``first``, then zero bytes up to ``size``, then ``last`` (so one line of about ``size``
    bytes when ``first`` ends inside a line and ``last`` starts with its end)."""
    with open(path, "wb") as fh:
        fh.write(first)
        fh.truncate(size)
        fh.seek(size)
        fh.write(last)
    return path


def huge_jsonl(path: Path, size: int = 2 << 30) -> Path:
    """A good line, a line of ``size`` bytes, a good line."""
    return huge_line(path, size, b'{"text": "good one"}\n{"text": "', b'"}\n{"text": "good two"}\n')


def huge_json_gz(path: Path, size: int) -> Path:
    """A gzipped JSON array of one Alpaca record whose output is ``size`` spaces long."""
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(b'[{"instruction": "Say something.", "output": "')
        chunk = b" " * (1 << 20)
        for _ in range(size >> 20):
            fh.write(chunk)
        fh.write(b'"}]\n')
    return path


def html_page(path: Path) -> Path:
    """An HTML page (an error page a download saved under a source's file name), well-formed or not."""
    path.write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Not found</title></head>\n'
        "<body><h1>404</h1><p>The page you asked for does not exist.</p></body></html>\n",
        encoding="utf-8",
    )
    return path


# -- a reader in a child process ------------------------------------------------------------------


def read_in_child(kind: str, path: Path, timeout: float = 600, **overrides: int) -> dict:
    """Run reader ``kind`` on ``path`` in a fresh interpreter, lenient then strict (corpus readers) or strict only,
    with the limits of :mod:`medfoundry.limits` named in ``overrides`` set (smaller limits make smaller bombs,
    which are quicker to read, as telling). Returns ``ids`` and ``skips`` ([line, reason]) of the lenient run,
    ``error`` (the strict run's message, or None), ``peak_mb``: the child's peak resident memory, and
    ``growth_mb``: how much of it the reading added to what the imports took."""
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import input_bombs; input_bombs._child()"
    run = subprocess.run(
        [sys.executable, "-c", code, kind, str(path), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if run.returncode != 0:
        raise RuntimeError(f"reader {kind} on {path.name} exited with {run.returncode}: {run.stderr[-2000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def _peak_mb() -> float:
    """This process's peak resident memory (``VmHWM``: of its own address space, which ``execve`` starts afresh;
    ``ru_maxrss`` would carry over the parent's peak from the fork, a long-lived pytest worker's)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def _child() -> None:
    from medfoundry import limits
    from medfoundry.corpus.readers.base import ReadContext

    kind, path = sys.argv[1], Path(sys.argv[2])
    for name, value in json.loads(sys.argv[3]).items():
        setattr(limits, name, value)
    _read(kind, path, ReadContext(path))  # imports what the reader needs before the baseline is taken
    base = _peak_mb()
    result = {"ids": [], "skips": [], "error": None}
    if kind in ("pubmed", "jats", "jsonl", "text"):
        ctx = ReadContext(path, strict=False)
        result["ids"] = [
            getattr(item, "native_id", None) or getattr(item, "text", "") for item in _read(kind, path, ctx)
        ]
        result["skips"] = [[skip.line, skip.reason] for skip in ctx.skips]
    result["error"] = _strict_error(kind, path)
    peak = _peak_mb()
    print(json.dumps({**result, "peak_mb": round(peak), "growth_mb": round(peak - base)}))


def _read(kind: str, path: Path, ctx):
    """The reader of ``kind`` on ``path`` (imported here: a child imports only what its reader needs)."""
    if kind == "pubmed":
        from medfoundry.corpus.readers.pubmed_xml import read_pubmed_xml

        return read_pubmed_xml(path, ctx)
    if kind == "jats":
        from medfoundry.corpus.readers.jats import read_jats

        return read_jats(path, ctx)
    if kind == "jsonl":
        from medfoundry.corpus.config import FieldMap
        from medfoundry.corpus.readers.jsonl import read_jsonl

        return read_jsonl(path, ctx, FieldMap(text=["text"]))
    if kind == "text":
        from medfoundry.corpus.readers.jsonl import read_text

        return read_text(path, ctx)
    from medfoundry.sft.formats import read_conversations

    return read_conversations(path)


def _strict_error(kind: str, path: Path) -> str | None:
    from medfoundry.corpus.readers.base import ReadContext
    from medfoundry.errors import InputError

    try:
        for _ in _read(kind, path, ReadContext(path, strict=True)):
            pass
    except InputError as exc:
        return str(exc)
    return None
