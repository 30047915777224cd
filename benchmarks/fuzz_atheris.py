"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the readers whose input structure random generation
reaches poorly: the PubMed and JATS XML readers (through ``safe_xml``) and JSON parsing (the strict JSONL
reader, the corpus JSONL readers and the JSON-array scanner of the instruction-data reader).

    python benchmarks/fuzz_atheris.py TARGET WORK [libFuzzer options]
    python benchmarks/fuzz_atheris.py jats /tmp/fuzz-jats -max_total_time=60 -seed=1 -timeout=10 -rss_limit_mb=2048
    python benchmarks/fuzz_atheris.py jats /tmp/fuzz-jats /tmp/fuzz-jats/crashes/crash-1a2b...   # run one input again

TARGET is ``pubmed_xml``, ``jats`` or ``jsonl``. WORK gets ``corpus/``, seeded with small real files
(``../shared/data`` when present, ``tests/fixtures``) and minimal documents, to which libFuzzer adds the inputs
that reach new code; ``TARGET.dict``, the readers' element names and JSON keys; and ``crashes/``, where libFuzzer
saves an input that failed (``crash-*``), ran past ``-timeout`` (``timeout-*``) or grew past ``-rss_limit_mb``
(``oom-*``). Each input goes through the checks of ``tests/fuzz_targets.py``, as a plain file: anything but
records writable as UTF-8 JSON or an ``InputError`` naming the file is a failure. Only medfoundry's Python code is
instrumented (lxml and json are C), so the coverage is that of the readers' own code.

``atheris.Fuzz()`` never returns: libFuzzer ends the process, with status 0 after ``-runs`` or
``-max_total_time``, and non-zero after a failure. Everything is written to stderr.
"""

from __future__ import annotations

import gzip
import os
import sys
from itertools import islice
from pathlib import Path

import atheris

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

with atheris.instrument_imports(include=["medfoundry"]):
    import fuzz_targets as ft

MINIMAL_JSON = [
    b'{"text": "Aspirin lowers fever.", "id": "1", "meta": {"year": 2020}}',
    b"{}",
    b"[]",
    b'""',
    b'[{"instruction": "Name a vitamin.", "input": "", "output": "C"}]',
    b'{"a": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}}',
]
JSON_TOKENS = [
    b'"text"',
    b'"title"',
    b'"id"',
    b'"meta"',
    b'"pmid"',
    b'"messages"',
    b'"conversations"',
    b'"role"',
    b'"content"',
    b'"from"',
    b'"value"',
    b'"instruction"',
    b'"input"',
    b'"output"',
    b'"system"',
    b'"options"',
    b'"user"',
    b'"assistant"',
    b'"human"',
    b'"gpt"',
    b"null",
    b"true",
    b"1e999",
    b"NaN",
    b"Infinity",
    b'"\\ud800"',
    b'"\\udc00"',
    b"\\u0000",
    b'":',
    b"\xef\xbb\xbf",
    b"\xe2\x80\xa8",
]


def _xml_tokens(tags: list[str], attributes: dict[str, list[str]]) -> list[bytes]:
    markup = [f"<{t}>" for t in tags] + [f"</{t}>" for t in tags]
    markup += [f'{name}="{value}"' for name, values in attributes.items() for value in values]
    return [m.encode() for m in markup + ft.XML_REFERENCES] + ft.MUTATION_SNIPPETS + [b"<!DOCTYPE", b"<!ENTITY"]


def _head(path: Path, lines: int, longest: int = 4096) -> list[bytes]:
    """The first ``lines`` lines of a (gzipped) JSONL file that are no longer than ``longest`` bytes (small seeds
    keep libFuzzer's inputs small and fast), or nothing when the file is absent."""
    if not path.is_file():
        return []
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as fh:
        return list(islice((line.rstrip(b"\n") for line in fh if len(line) <= longest), lines))


def _jsonl_seeds() -> list[bytes]:
    fixtures = [p.read_bytes() for p in sorted((ft.FIXTURES / "sft").glob("*.json*"))]
    shared = ft.SHARED_DATA / "corpus"
    heads = [
        b"\n".join(_head(p, 3))
        for p in (
            shared / "pubmed_abstracts.jsonl.gz",
            shared / "general_replay.jsonl.gz",
            ft.FIXTURES / "guidelines" / "guidelines_sample.jsonl",
        )
    ]
    return [s for s in fixtures + heads + MINIMAL_JSON if s]


def _pubmed_seeds() -> list[bytes]:
    return ft.PUBMED_REAL + [ft.pubmed(), ft.pubmed_article("1", "Title", [("", "Text.")], "2020", "")]


def _jats_seeds() -> list[bytes]:
    body = "<sec><title>Results</title><p>Text.</p></sec>"
    return ft.JATS_REAL + [ft.jats(), ft.jats_article("Title", "<p>Abstract.</p>", body, "2020", "", "")]


def _json_checks(data: bytes, gz: int | None) -> None:
    ft.check_strict_jsonl(data, gz)
    ft.check_corpus_jsonl(data, gz)
    ft.check_instructions((data, "fuzz.json"), "auto", gz)


TARGETS = {  # name -> (check of (data, gz), its seed inputs, its dictionary's tokens)
    "pubmed_xml": (ft.check_pubmed, _pubmed_seeds, lambda: _xml_tokens(ft.PUBMED_TAGS, ft.PUBMED_ATTRS)),
    "jats": (ft.check_jats, _jats_seeds, lambda: _xml_tokens(ft.JATS_BLOCKS + ft.JATS_INLINE, ft.JATS_ATTRS)),
    "jsonl": (_json_checks, _jsonl_seeds, lambda: JSON_TOKENS),
}


def _dictionary_line(token: bytes) -> str:
    """A libFuzzer dictionary entry: the token in double quotes, with ``\\xNN`` for quotes, backslashes and
    anything that is not printable ASCII."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token) + '"'


def prepare(target: str, work: Path) -> tuple[Path, Path]:
    """Seed ``WORK/corpus`` (kept when it exists: a second run goes on from it) and write the dictionary."""
    _, seeds, tokens = TARGETS[target]
    corpus = work / "corpus"
    if not corpus.is_dir():
        corpus.mkdir(parents=True)
        for n, seed in enumerate(seeds()):
            (corpus / f"seed-{n}").write_bytes(seed)
    (work / "crashes").mkdir(exist_ok=True)
    dictionary = work / f"{target}.dict"
    dictionary.write_text("\n".join(map(_dictionary_line, dict.fromkeys(tokens()))) + "\n")
    return corpus, dictionary


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} WORK [libFuzzer options]")
    target, work, options = argv[1], Path(argv[2]), argv[3:]
    corpus, dictionary = prepare(target, work)
    os.dup2(2, 1)  # atheris prints a failure's traceback on stdout, libFuzzer the rest on stderr: one log
    inputs = [] if any(not o.startswith("-") for o in options) else [str(corpus)]  # files given: run just those
    atheris.Setup(
        [argv[0], *options, f"-artifact_prefix={work / 'crashes'}/", f"-dict={dictionary}", *inputs],
        lambda data: TARGETS[target][0](data, None),
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
