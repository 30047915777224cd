"""Instruction formats: Alpaca, messages and ShareGPT into one Conversation; auto-detection and override;
every bad record reported with its file and line."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES
from medfoundry.errors import InputError
from medfoundry.sft.formats import Message, read_conversations

SFT = FIXTURES / "sft"


def roles(conversation) -> list[str]:
    return [m.role for m in conversation.messages]


def test_alpaca_records_become_user_assistant_turns_with_their_lines():
    records = list(read_conversations(SFT / "alpaca.jsonl"))
    assert [c.line for c in records] == [1, 2, 4]  # a blank line 3 is skipped but counted
    assert roles(records[0]) == ["user", "assistant"] and records[0].system is None
    assert records[1].messages[0].content == (
        "Classify the sentence as a finding or a method.\n\nPatients were randomized to metformin or placebo."
    )
    assert records[1].messages[1] == Message("assistant", "method")
    assert records[2].system == "You are a careful medical assistant." and roles(records[2]) == [
        "system",
        "user",
        "assistant",
    ]
    assert records[2].location == f"{SFT / 'alpaca.jsonl'}:4"


def test_messages_json_array_keeps_each_record_line_and_options():
    records = list(read_conversations(SFT / "messages.json"))
    assert [c.line for c in records] == [2, 9, 17]
    assert roles(records[1]) == ["user", "assistant", "user", "assistant"]
    assert records[1].messages[0].options == {"A": "Vitamin A", "B": "Vitamin C"}
    assert (
        records[1].messages[0].folded()
        == "Which vitamin deficiency causes scurvy?\n\nOptions:\nA. Vitamin A\nB. Vitamin C"
    )


def test_sharegpt_gzipped_reads_like_the_plain_file(tmp_path: Path):
    packed = tmp_path / "sharegpt.jsonl.gz"
    with open(SFT / "sharegpt.jsonl", "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain, zipped = list(read_conversations(SFT / "sharegpt.jsonl")), list(read_conversations(packed))
    assert [c.messages for c in plain] == [c.messages for c in zipped]
    assert roles(plain[0]) == ["system", "user", "assistant"] and plain[1].messages[-1].content == "Iron deficiency."


def test_explicit_format_overrides_detection_and_names_the_mismatch():
    assert len(list(read_conversations(SFT / "sharegpt.jsonl", "sharegpt"))) == 2
    with pytest.raises(
        InputError, match=r"sharegpt.jsonl:1: record has no 'messages' list \(expected by the messages format\)"
    ):
        list(read_conversations(SFT / "sharegpt.jsonl", "messages"))
    with pytest.raises(InputError, match="unknown format 'openai'"):
        list(read_conversations(SFT / "sharegpt.jsonl", "openai"))


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "bad_missing_output.jsonl",
            r"bad_missing_output.jsonl:2: record is missing its response \(field 'output' is missing\)",
        ),
        (
            "bad_unknown_role.json",
            r"bad_unknown_role.json:3: message 2 has unknown role 'doctor'; expected one of system, user, assistant",
        ),
        ("bad_unknown_from.jsonl", r"bad_unknown_from.jsonl:3: turn 2 has unknown role 'bot' in 'from'"),
        (
            "bad_ends_with_user.jsonl",
            r"bad_ends_with_user.jsonl:1: record is missing its response: the last turn is a user turn",
        ),
        ("bad_mixed.jsonl", r"bad_mixed.jsonl:2: record is missing its instruction"),
        ("bad_json.jsonl", r"bad_json.jsonl:2: invalid JSON"),
    ],
)
def test_bad_records_are_named_by_file_and_line(name, message):
    with pytest.raises(InputError, match=message):
        list(read_conversations(SFT / name))


def test_turn_order_and_empty_responses_are_refused(tmp_path: Path):
    cases = {
        '{"messages": [{"role": "assistant", "content": "Hello."}]}': "turn 1 is 'assistant' but 'user' was expected",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}': "a system message may only come first",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}': (
            "record is missing its response: assistant turn 2 is empty"
        ),
        '{"text": "plain pretraining text"}': r"cannot tell the format of this record \(keys: \['text'\]\)",
    }
    for i, (record, message) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.jsonl"
        path.write_text(record + "\n")
        with pytest.raises(InputError, match=f"case{i}.jsonl:1: {message}"):
            list(read_conversations(path))


def test_a_json_file_that_is_not_a_list_of_records_is_refused(tmp_path: Path):
    path = tmp_path / "one.json"
    path.write_text('"just a string"')
    with pytest.raises(InputError, match="one.json:1: expected a JSON array of records"):
        list(read_conversations(path))
    path.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]')
    with pytest.raises(InputError, match=r"one.json:3: invalid JSON: expected ',' or '\]'"):
        list(read_conversations(path))


def test_jsonl_lines_split_on_newlines_only(tmp_path: Path):
    """Unescaped U+2028 / U+0085 are valid inside JSON strings and must not end a record."""
    path = tmp_path / "odd.jsonl"
    path.write_text('{"instruction": "a\u2028b", "output": "c\u0085d"}\n', encoding="utf-8")
    (record,) = read_conversations(path)
    assert record.messages[0].content == "a\u2028b" and record.messages[1].content == "c\u0085d"
