"""Benchmark converters on the real shared files (PubMedQA PQA-L, MedMCQA, MedQA, MMLU), plus the edge
cases of their formats on small hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared
from medfoundry.errors import ConfigError, InputError
from medfoundry.sft.converters import convert, medmcqa, medqa, mmlu, pubmedqa


def test_pubmedqa_keeps_the_train_dev_half_of_pqa_l():
    path = shared("benchmarks/pubmedqa/ori_pqal.json")
    test_ids = set(json.loads((path.parent / "test_ground_truth.json").read_text()))
    records = list(pubmedqa(path))
    assert len(records) == 500 and not {c.pmid for c in records} & test_ids
    raw = json.loads(path.read_text())
    first = records[0]
    assert first.messages[0].content.startswith(raw[first.pmid]["CONTEXTS"][0])
    assert f"Question: {raw[first.pmid]['QUESTION']}" in first.messages[0].content
    assert first.messages[1].content == raw[first.pmid]["final_decision"]
    assert first.location.startswith(f"{path}:") and first.line > 1
    with_reasoning = next(iter(pubmedqa(path, reasoning=True)))
    assert (
        with_reasoning.messages[1].content
        == f"{raw[first.pmid]['LONG_ANSWER']}\n\nAnswer: {raw[first.pmid]['final_decision']}"
    )
    labels = {c.messages[1].content for c in records}
    assert labels == {"yes", "no", "maybe"}


def test_pubmedqa_without_its_test_ids_refuses_to_guess(tmp_path: Path):
    (tmp_path / "ori_pqal.json").write_text('{"1": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "yes"}}')
    with pytest.raises(InputError, match="PubMedQA test ids not found"):
        list(pubmedqa(tmp_path / "ori_pqal.json"))


def test_medmcqa_one_based_cop_and_explanations_as_chain_of_thought():
    path = shared("benchmarks/medmcqa/dev.jsonl")
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    records = list(medmcqa(path, reasoning=True))
    assert len(records) == len(raw) == 4183
    for record, source in zip(records[:200], raw[:200]):
        letter = "ABCD"[source["cop"] - 1]
        answer = f"{letter}. {source['op' + letter.lower()].strip()}"
        expected = f"{source['exp'].strip()}\n\nAnswer: {answer}" if (source["exp"] or "").strip() else answer
        assert record.messages[1].content == expected
        assert list(record.messages[0].options) == ["A", "B", "C", "D"] and record.record_id == source["id"]
    assert records[1].line == 2


def _medmcqa_file(path: Path, cops: list[int]) -> Path:
    rows = [
        {"question": f"q{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c, "exp": None, "id": str(i)}
        for i, c in enumerate(cops)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_medmcqa_cop_base_is_detected_or_must_be_given(tmp_path: Path):
    zero_based = list(medmcqa(_medmcqa_file(tmp_path / "train.jsonl", [0, 3, 1])))
    assert [c.messages[1].content for c in zero_based] == ["A. a", "D. d", "B. b"]
    ambiguous = _medmcqa_file(tmp_path / "amb.jsonl", [1, 2, 3])
    with pytest.raises(InputError, match=r"cannot tell whether cop counts from 0 or 1 .*set cop_base"):
        list(medmcqa(ambiguous))
    assert [c.messages[1].content for c in medmcqa(ambiguous, cop_base=1)] == ["A. a", "B. b", "C. c"]
    assert [c.messages[1].content for c in convert("medmcqa", ambiguous, cop_base=0)] == ["B. b", "C. c", "D. d"]
    with pytest.raises(InputError, match=r"train.jsonl:1: cop 0 is not an option number 1..4"):
        list(medmcqa(tmp_path / "train.jsonl", cop_base=1))


@pytest.mark.parametrize("name, letters", [("us_4_options_test.jsonl", "ABCD"), ("us_5_options_test.jsonl", "ABCDE")])
def test_medqa_answers_match_the_answer_text(name, letters):
    path = shared(f"benchmarks/medqa/{name}")
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    records = list(medqa(path))
    assert len(records) == 1273
    for record, source in zip(records, raw):
        assert "".join(record.messages[0].options) == letters
        assert record.messages[1].content == f"{source['answer_idx']}. {source['answer'].strip()}"


def test_medqa_bad_answer_is_named(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}) + "\n")
    with pytest.raises(InputError, match=r"train.jsonl:1: answer_idx 'E' is not one of the options \['A', 'B'\]"):
        list(medqa(path))


def test_mmlu_dev_folder_with_multiline_rows(tmp_path: Path):
    records = list(mmlu(shared("benchmarks/mmlu/dev")))
    assert len(records) == 30 and records[0].location.endswith("anatomy_dev.csv:1")
    assert records[0].messages[1].content == "D. The second and third pharyngeal arches"
    path = tmp_path / "x_dev.csv"
    path.write_text('"A question\nover two lines",a,b,c,d,B\nnext,a,b,c,d,Z\n')
    with pytest.raises(InputError, match=r"x_dev.csv:3: expected 6 columns question,A,B,C,D,answer with answer A-D"):
        list(mmlu(path))


def test_convert_checks_options_per_converter():
    with pytest.raises(ConfigError, match=r"converter 'medqa' does not take \['reasoning'\]"):
        convert("medqa", "x.jsonl", reasoning=True)
    with pytest.raises(ConfigError, match="unknown converter 'usmle'"):
        convert("usmle", "x.jsonl")
