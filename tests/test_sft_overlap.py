"""The test-overlap guard on the real evaluation sets: test splits converted for training are refused,
short items are caught by their exact text, stock vignette openings are not, PubMedQA's train half passes."""

from __future__ import annotations

import pytest

from conftest import shared
from medfoundry.sft.converters import medmcqa, medqa, mmlu, pubmedqa
from medfoundry.sft.formats import Message, make_conversation
from medfoundry.sft.overlap import OverlapGuard, overlap_error


@pytest.fixture(scope="module")
def guard() -> OverlapGuard:
    return OverlapGuard(shared("benchmarks"), ["pubmedqa", "medqa", "medmcqa", "mmlu"])


def test_every_test_item_converted_for_training_is_caught(guard):
    root = shared("benchmarks")
    for benchmark, records in (
        ("medmcqa", medmcqa(root / "medmcqa" / "dev.jsonl", reasoning=True)),
        ("medqa", medqa(root / "medqa" / "us_5_options_test.jsonl")),
        ("mmlu", mmlu(root / "mmlu" / "test")),
    ):
        found = [guard.check(c) for c in records]
        assert all(found) and {f.benchmark for f in found} == {benchmark}


def test_items_too_short_for_a_13_gram_are_caught_by_their_text(guard):
    short = [
        c
        for c in medmcqa(shared("benchmarks/medmcqa/dev.jsonl"))
        if len((c.messages[0].content + " " + " ".join(c.messages[0].options.values())).split()) < 12
    ]
    assert len(short) > 100
    reworded_case = make_conversation(
        [
            Message("user", short[0].messages[0].content.upper(), short[0].messages[0].options),
            Message("assistant", "A"),
        ],
        "train.jsonl",
        3,
    )
    found = guard.check(reworded_case)
    assert found.reason == "same_item" and found.benchmark == "medmcqa" and found.location == "train.jsonl:3"


def test_a_stock_vignette_opening_is_not_an_overlap_but_the_question_in_other_words_is(guard):
    item = next(iter(medqa(shared("benchmarks/medqa/us_4_options_test.jsonl"))))
    question = item.messages[0].content
    opening = " ".join(question.split()[:16]) + " She has had no fever, and her medications have not changed recently."
    assert guard.check(make_conversation([Message("user", opening), Message("assistant", "ok")], "x", 1)) is None
    copied = make_conversation([Message("user", f"Case: {question}\nWhat now?"), Message("assistant", "ok")], "x", 2)
    found = guard.check(copied)
    assert found.reason == "ngram_overlap" and found.benchmark == "medqa"


def test_pubmedqa_train_half_passes_and_test_pmids_are_caught(guard):
    records = list(pubmedqa(shared("benchmarks/pubmedqa/ori_pqal.json")))
    assert [guard.check(c) for c in records] == [None] * 500
    test_pmid = next(iter(guard.index.pmids))
    tagged = make_conversation([Message("user", "Summarize."), Message("assistant", "ok")], "x", 1, pmid=test_pmid)
    assert guard.check(tagged).reason == "pubmedqa_test_pmid"


def test_mmlu_dev_holds_five_items_that_are_also_mmlu_test_items(guard):
    found = [f for f in map(guard.check, mmlu(shared("benchmarks/mmlu/dev"))) if f]
    assert len(found) == 5 and {f.reason for f in found} == {"same_item"}
    assert found[0].location.endswith("clinical_knowledge_dev.csv:1") and "college_medicine_test.csv" in found[0].item


def test_the_refusal_counts_and_locates_records(guard):
    found = [guard.check(c) for c in medmcqa(shared("benchmarks/medmcqa/dev.jsonl"))]
    message = str(overlap_error(found, 4183))
    assert message.startswith("4183 of 4183 training records overlap evaluation test splits (medmcqa: 4183):")
    assert "dev.jsonl:1: medmcqa test item" in message and "... and 4178 more" in message
    assert "allow_test_overlap: true" in message
