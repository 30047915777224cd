"""Benchmark items are ranked by the fraction of their n-grams found in a text, not by the count: a record
holding all 15 13-grams of a short MedMCQA item and 40 of the 300 of a long MedQA vignette is refused,
naming the MedMCQA item (by count the vignette ranks first, at 13% covered, and the record passed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared
from medfoundry.corpus.decontam import BenchmarkIndex
from medfoundry.corpus.ngrams import ngram_hashes, word_hashes, words
from medfoundry.sft.formats import Message, make_conversation
from medfoundry.sft.overlap import OverlapGuard

LONG = 1109  # a real MedQA test vignette with its four options: exactly 300 distinct 13-grams


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _medmcqa_text(r: dict) -> str:
    return "\n".join(r[k] or "" for k in ("question", "opa", "opb", "opc", "opd"))


def _distinct_ngrams(text: str) -> int:
    return len(set(ngram_hashes(word_hashes(text), 13).tolist()))


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(benchmarks folder, the long MedQA record, the short MedMCQA record): real test items, among 60 MedQA
    and 300 MedMCQA others (both MedQA files hold the 4-option version)."""
    real = shared("benchmarks")
    medqa = _jsonl(real / "medqa" / "us_4_options_test.jsonl")
    long = medqa[LONG]
    medqa = [*medqa[:60], long]
    medmcqa = _jsonl(real / "medmcqa" / "dev.jsonl")[:300]
    short = next(r for r in medmcqa if _distinct_ngrams(_medmcqa_text(r)) == 15)
    root = tmp_path_factory.mktemp("benchmarks")
    for name in ("us_4_options_test.jsonl", "us_5_options_test.jsonl"):
        _write_jsonl(root / "medqa" / name, medqa)
    _write_jsonl(root / "medmcqa" / "dev.jsonl", medmcqa)
    return root, long, short


def _record_text(long: dict, short: dict) -> str:
    """52 consecutive words of the vignette (40 of its 13-grams), then the short item's question and options."""
    vignette = words("\n".join([long["question"], *long["options"].values()]))
    return "A case to discuss: " + " ".join(vignette[100:152]) + ".\n\nAnd a quiz:\n" + _medmcqa_text(short)


def test_index_ranks_items_by_fraction_and_reports_it(case):
    root, long, short = case
    index = BenchmarkIndex.build(root, ["medqa", "medmcqa"], 13, pubmedqa_ids=False)
    counts = dict(zip(index.items, index.item_ngrams.tolist()))
    assert counts[("medqa", "60")] == 300 and counts[("medmcqa", short["id"])] == 15

    vignette_only = index.match(_record_text(long, short).split("\n\nAnd a quiz")[0])
    assert (vignette_only.item, vignette_only.matches, vignette_only.item_ngrams) == ("60", 40, 300)

    hit = index.match(_record_text(long, short))
    assert (hit.benchmark, hit.item, hit.matches, hit.item_ngrams, hit.fraction) == ("medmcqa", short["id"], 15, 15, 1)
    assert hit.detail.startswith(f"15 of the 15 13-grams of medmcqa item {short['id']} (100%;")
    assert "55 of them in benchmarks" in hit.detail  # 40 + 15: what min_matches counts, unchanged


def test_guard_refuses_the_record_naming_the_short_item(case):
    root, long, short = case
    guard = OverlapGuard(root, ["medqa", "medmcqa"])
    record = make_conversation([Message("user", _record_text(long, short)), Message("assistant", "B")], "sft.jsonl", 7)
    found = guard.check(record)
    assert (found.reason, found.benchmark, found.item, found.location) == (
        "ngram_overlap",
        "medmcqa",
        short["id"],
        "sft.jsonl:7",
    )
    assert found.detail == "15 of the item's 15 13-grams (100%)"

    # the vignette's 40 of 300 alone (13%) stays under min_fraction (0.5), as before
    alone = _record_text(long, short).split("\n\nAnd a quiz")[0]
    assert guard.check(make_conversation([Message("user", alone), Message("assistant", "B")], "sft.jsonl", 8)) is None
    # the threshold keeps its meaning: refused when the best-covered item has at least min_fraction covered
    for min_fraction, refused in ((0.14, False), (40 / 300, True)):
        guard = OverlapGuard(root, ["medqa", "medmcqa"], min_fraction=min_fraction)
        found = guard.check(make_conversation([Message("user", alone), Message("assistant", "B")], "x", 1))
        assert (found is not None and found.item == "60") is refused
