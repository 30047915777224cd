"""Fuzzing every reader of untrusted input with hypothesis: the PubMed and JATS XML readers, the corpus JSONL
readers, the strict JSONL reader, the instruction-data readers and the chat-template renderer.

Inputs are random bytes, documents generated from each reader's own vocabulary (so that they reach the layout
code, not only the parser's error path) and mutations of real records (``../shared/data`` and
``tests/fixtures/sft``). The only exception allowed is an :class:`~medfoundry.errors.InputError` naming the file;
in lenient mode a corpus reader never raises, and it reports a skip exactly when strict mode would have failed.
Every record that comes out must be writable as UTF-8 JSON. The strategies and checks live in
``fuzz_targets.py``, which the ``fuzz`` group of ``benchmarks/reliability_report.py`` runs too.

The CI tests run a fixed set of 100 examples (``derandomize``); each has a ``_long`` twin, marked ``long``
(``make test-long``), that explores a hundred times more. ``FUZZ_EXAMPLES=N`` overrides the long runs' count.
"""

from __future__ import annotations

import gzip
import os

import pytest

pytest.importorskip("hypothesis", reason="needs hypothesis (the dev extras)")

from hypothesis import HealthCheck, given, settings

from fuzz_targets import PUBMED_REAL, TARGETS, build_renderers, check_corpus_reader, jats_article
from medfoundry.corpus.readers.jats import read_jats
from medfoundry.errors import InputError
from medfoundry.io import iter_json_lines
from medfoundry.sft.formats import Message, make_conversation, read_conversations

CI = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
LONG = settings(CI, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 3000)), derandomize=False)


def fuzz(target: str):
    """A CI test and its long twin running the check of ``TARGETS[target]`` on its strategies."""
    check, strategies = TARGETS[target].check, TARGETS[target].strategies
    return (CI(given(**strategies)(check)), pytest.mark.long(LONG(given(**strategies)(check))))


# --- PubMed XML ------------------------------------------------------------------------------------

test_pubmed_xml, test_pubmed_xml_long = fuzz("pubmed_xml")


def test_pubmed_mutations_use_real_files():
    if not PUBMED_REAL:
        pytest.skip("needs ../shared/data/corpus/pubmed_xml (the shared data folder is absent in this checkout)")
    assert len(PUBMED_REAL) == 2


# --- JATS ------------------------------------------------------------------------------------------

test_jats, test_jats_long = fuzz("jats")


def test_jats_a_year_int_cannot_read_is_no_year():
    """Found by fuzzing: ``"²".isdigit()`` is true but ``int("²")`` fails; the year is simply unknown."""
    (record,), _ = check_corpus_reader(
        read_jats, jats_article("T", "<p>Abstract text.</p>", "", "²", "", ""), "sup2.nxml"
    )
    assert record.meta["year"] is None and "Abstract text." in record.text
    (dated,), _ = check_corpus_reader(
        read_jats, jats_article("T", "<p>Abstract text.</p>", "", "2019", "", ""), "y.nxml"
    )
    assert dated.meta["year"] == 2019  # the same article with a readable year keeps it


def test_jats_a_year_int_refuses_is_no_year():
    """Found by the fuzz group of the reliability report: a year of more than 4300 digits made int() raise."""
    article = jats_article("T", "<p>Abstract.</p>", "", "1" * 5000, "", "")
    (record,), _ = check_corpus_reader(read_jats, article, "year.nxml")
    assert record.meta["year"] is None


# --- JSON lines -------------------------------------------------------------------------------------

test_strict_jsonl, test_strict_jsonl_long = fuzz("strict_jsonl")


def test_strict_jsonl_refuses_what_json_loads_raises_other_errors_for(tmp_path):
    """Found by fuzzing: json.loads raises ValueError (a 5000-digit integer) and RecursionError (deep nesting),
    not JSONDecodeError; and accepts lone surrogates, which no tokenizer or UTF-8 writer accepts later."""
    for number, line in enumerate((b"1" * 5000, b"[" * 100_000, b'{"text": "\\ud800"}')):
        path = tmp_path / f"edge{number}.jsonl"
        path.write_bytes(b'{"ok": 1}\n' + line + b"\n")
        with pytest.raises(InputError, match=rf"edge{number}\.jsonl:2: invalid JSON"):
            list(iter_json_lines(path))
    path.write_bytes(b'{"text": "\\ud83d\\ude00"}\n')  # a surrogate pair is a character (U+1F600)
    assert [value for _, value in iter_json_lines(path)] == [{"text": "\U0001f600"}]


test_corpus_jsonl, test_corpus_jsonl_long = fuzz("corpus_jsonl")


# --- instruction data -------------------------------------------------------------------------------

test_instruction_data, test_instruction_data_long = fuzz("instruction_data")


def test_instruction_data_edge_cases_found_by_fuzzing(tmp_path):
    cases = {
        "unhashable.jsonl": b'{"conversations": [{"from": ["human"], "value": "hi"}]}',  # was a TypeError
        "surrogate.jsonl": b'{"instruction": "a\\udc80", "output": "b"}',
        "truncated.json": b'[{"instruction": "a", "output": "b"}',  # was read as complete
        "trailing.json": b'[{"instruction": "a", "output": "b"}] [',
        "number_key.json": b'{1: {"instruction": "a", "output": "b"}}',
        "huge_int.json": b'[{"instruction": "a", "output": "b", "n": ' + b"9" * 5000 + b"}]",
        "deep.json": b"[" + b"[" * 100_000,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            list(read_conversations(tmp_path / name))
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(b'[{"instruction": "a", "output": "b"}]')[:-6])
    with pytest.raises(InputError, match=r"cut\.json\.gz: truncated or corrupt gzip"):  # was an EOFError
        list(read_conversations(tmp_path / "cut.json.gz"))


# --- chat-template renderer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renderers(tmp_path_factory) -> dict:
    """Renderers for chatml, biomed_llama and a model's own template (Zephyr's), with and without a system prompt,
    on a small byte-level BPE."""
    return build_renderers(tmp_path_factory.mktemp("fuzz_tok"))


test_renderer, test_renderer_long = fuzz("renderer")
test_renderer_any_roles, test_renderer_any_roles_long = fuzz("renderer_any_roles")


def test_renderer_refuses_a_lone_surrogate_naming_the_record(renderers):
    """Found by fuzzing: the tokenizer raised a bare UnicodeEncodeError on a lone surrogate."""
    conversation = make_conversation([Message("user", "a\ud800b"), Message("assistant", "c")], "data.jsonl", 9)
    with pytest.raises(InputError, match=r"data\.jsonl:9: .*lone UTF-16 surrogate \(\\ud800\)"):
        renderers[("chatml", None)](conversation)
