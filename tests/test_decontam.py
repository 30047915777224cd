"""BenchmarkIndex: a small hand-made benchmark folder first, then the real evaluation sets."""

from __future__ import annotations

import csv
import gzip
import json
import pickle
import re
from pathlib import Path

import pytest

from conftest import shared
from medfoundry.corpus.decontam import BENCHMARKS, BenchmarkIndex
from medfoundry.errors import InputError, MedfoundryError

FILLER = (
    "Unrelated opening paragraph about hospital staffing levels and the weather in spring.\n\n{}\n\n"
    "A closing remark on budgets, parking and the cafeteria menu follows here."
)
LONG_Q = "A 45-year-old man presents with crushing chest pain radiating to the left arm for two hours"
OTHER_Q = "A 30-year-old woman has a painless thyroid nodule found during a routine visit to her physician"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A benchmarks folder with the official layout and a handful of items."""
    (tmp_path / "pubmedqa").mkdir()
    contexts = [
        "Statins lower cholesterol in adults with diabetes and reduce major cardiovascular events over ten years."
    ]
    pqal = {
        "111": {"QUESTION": "Do statins help?", "CONTEXTS": contexts},
        "222": {
            "QUESTION": "Is this train?",
            "CONTEXTS": ["This train abstract is not part of the test split at all."],
        },
    }
    (tmp_path / "pubmedqa" / "ori_pqal.json").write_text(json.dumps(pqal))
    (tmp_path / "pubmedqa" / "test_ground_truth.json").write_text(json.dumps({"111": "yes"}))
    options = {"A": "Myocardial infarction", "B": "Pericarditis"}
    write_jsonl(tmp_path / "medqa" / "us_4_options_test.jsonl", [{"question": LONG_Q, "options": options}])
    write_jsonl(
        tmp_path / "medqa" / "us_5_options_test.jsonl", [{"question": LONG_Q, "options": {**options, "E": "GERD"}}]
    )
    ops = {"opa": "a", "opb": "b", "opc": "c", "opd": None}
    write_jsonl(
        tmp_path / "medmcqa" / "dev.jsonl",
        [{"question": OTHER_Q, "id": "m1", **ops}, {"question": "Short one?", "id": "m2", **ops}],
    )
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    with (tmp_path / "mmlu" / "test" / "anatomy_test.csv").open("w", newline="") as f:
        csv.writer(f).writerow(
            ["Which nerve, when damaged at the stylomastoid foramen, causes ipsilateral", "x", "y", "z", "w", "A"]
        )
    return tmp_path


def build(root: Path, sets=BENCHMARKS, ngram: int = 13, pubmedqa_ids: bool = True) -> BenchmarkIndex:
    return BenchmarkIndex.build(root, list(sets), ngram, pubmedqa_ids)


# --- small folder --------------------------------------------------------------------------------


def test_summary_counts_items_and_short_items(tiny):
    summary = build(tiny).summary()
    assert summary["pubmedqa_test_pmids"] == 1
    assert summary["benchmarks"]["pubmedqa"]["items"] == 1  # the train PMID is not indexed
    assert summary["benchmarks"]["medqa"]["items"] == 1  # 4- and 5-option lines are one item
    assert summary["benchmarks"]["medmcqa"] == {"items": 2, "ngrams": 9, "short_items": 1}  # 18 + 3 words
    assert summary["benchmarks"]["mmlu"]["items"] == 1


def test_match_reports_best_item_and_respects_min_matches(tiny):
    index = build(tiny)
    # 18 words of LONG_Q: 6 13-grams; OTHER_Q cut after its 15th word: 3 13-grams of the medmcqa item.
    hit = index.match(FILLER.format(LONG_Q + " " + " ".join(OTHER_Q.split()[:13])))
    # 6 of the medqa item's 10 (60%: its 18 words + options, the 4- and 5-option versions), 3 of m1's 9 (33%)
    assert (hit.reason, hit.benchmark, hit.item, hit.matches, hit.item_ngrams) == ("ngram_overlap", "medqa", "0", 6, 10)
    assert hit.detail.startswith("6 of the 10 13-grams of medqa item 0 (60%;")
    assert hit.detail.endswith(", 9 of them in benchmarks)")
    assert index.match(FILLER.format(LONG_Q), min_matches=6) is not None
    assert index.match(FILLER.format(LONG_Q), min_matches=7) is None
    assert index.match(FILLER.format("nothing to see here")) is None


def test_pmid_and_sets_options(tiny):
    index = build(tiny)
    assert index.match("anything", pmid="111").reason == "pubmedqa_test_pmid"
    assert index.match("anything", pmid="222") is None
    assert build(tiny, pubmedqa_ids=False).match("anything", pmid="111") is None
    only_mmlu = build(tiny, sets=["mmlu"])
    assert only_mmlu.pmids == frozenset()
    assert only_mmlu.match(FILLER.format(LONG_Q)) is None
    assert list(only_mmlu.summary()["benchmarks"]) == ["mmlu"]


def test_missing_file_names_file_and_config_field(tiny):
    (tiny / "medmcqa" / "dev.jsonl").unlink()
    build(tiny, sets=["pubmedqa", "medqa", "mmlu"])  # not needed when medmcqa is not selected
    with pytest.raises(MedfoundryError, match=r"decontam\.benchmarks_dir: .*medmcqa/dev\.jsonl is missing"):
        build(tiny)
    with pytest.raises(MedfoundryError, match="decontam.benchmarks_dir"):
        build(tiny / "nowhere")


def _drop_field(path: Path, lineno: int, field: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[lineno - 1])
    del record[field]
    lines[lineno - 1] = json.dumps(record) + "\n"
    path.write_text("".join(lines))


def test_missing_fields_name_file_line_and_field(tiny):
    _drop_field(tiny / "medmcqa" / "dev.jsonl", 2, "opb")
    with pytest.raises(InputError, match=r"medmcqa/dev\.jsonl:2: missing field 'opb'"):
        build(tiny, sets=["medmcqa"])

    _drop_field(tiny / "medqa" / "us_5_options_test.jsonl", 1, "options")
    with pytest.raises(InputError, match=r"us_5_options_test\.jsonl:1: missing field 'options'"):
        build(tiny, sets=["medqa"])

    with (tiny / "mmlu" / "test" / "anatomy_test.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["A question without its last option and answer", "x", "y", "z"])
    with pytest.raises(InputError, match=r"anatomy_test\.csv:2: expected 6 columns .*found 4"):
        build(tiny, sets=["mmlu"])

    pqal = tiny / "pubmedqa" / "ori_pqal.json"
    records = json.loads(pqal.read_text())
    del records["111"]["CONTEXTS"]
    pqal.write_text(json.dumps(records))
    with pytest.raises(InputError, match=r"ori_pqal\.json: PMID 111: missing field 'CONTEXTS'"):
        build(tiny, sets=["pubmedqa"])
    del records["111"]
    pqal.write_text(json.dumps(records))
    with pytest.raises(InputError, match=r"ori_pqal\.json: test PMID 111 \(from test_ground_truth\.json\) is missing"):
        build(tiny, sets=["pubmedqa"])


def test_pickle_round_trip(tiny):
    index = build(tiny)
    copy = pickle.loads(pickle.dumps(index))
    assert copy.match(FILLER.format(LONG_Q)) == index.match(FILLER.format(LONG_Q))
    assert copy.summary() == index.summary()


# --- real benchmarks -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> BenchmarkIndex:
    return build(shared("benchmarks/pubmedqa/ori_pqal.json").parents[1])


@pytest.fixture(scope="module")
def pubmedqa() -> tuple[dict, dict]:
    root = shared("benchmarks/pubmedqa/ori_pqal.json").parent
    return json.loads((root / "ori_pqal.json").read_text()), json.loads((root / "test_ground_truth.json").read_text())


def read_jsonl(relpath: str) -> list[dict]:
    return [json.loads(line) for line in shared(relpath).read_text().splitlines()]


def test_real_summary(real):
    summary = real.summary()
    assert summary["pubmedqa_test_pmids"] == 500
    assert {k: v["items"] for k, v in summary["benchmarks"].items()} == {
        "pubmedqa": 500,
        "medqa": 1273,
        "medmcqa": 4183,
        "mmlu": 1089,
    }


def test_pubmedqa_test_abstract(real, pubmedqa):
    records, test = pubmedqa
    pmid = next(iter(test))
    text = FILLER.format(" ".join(records[pmid]["CONTEXTS"]))
    hit = real.match(text)
    assert (hit.reason, hit.benchmark, hit.item) == ("ngram_overlap", "pubmedqa", pmid)
    assert hit.matches > 50
    assert real.match(text, pmid=pmid).reason == "pubmedqa_test_pmid"


def test_pubmedqa_train_item_is_not_caught(real, pubmedqa):
    records, test = pubmedqa
    pmid = next(p for p in records if p not in test)
    assert real.match(FILLER.format(" ".join(records[pmid]["CONTEXTS"])), pmid=pmid) is None


def test_medqa_question_in_a_paragraph(real):
    question = read_jsonl("benchmarks/medqa/us_4_options_test.jsonl")[100]["question"]
    hit = real.match(FILLER.format(question))
    assert (hit.benchmark, hit.item) == ("medqa", "100")


def test_medmcqa_question(real):
    record = next(r for r in read_jsonl("benchmarks/medmcqa/dev.jsonl") if len(re.findall(r"\w+", r["question"])) >= 13)
    hit = real.match(FILLER.format(record["question"]))
    assert (hit.benchmark, hit.item) == ("medmcqa", record["id"])


def test_mmlu_item(real):
    path = shared("benchmarks/mmlu/test/college_medicine_test.csv")
    with path.open(newline="") as f:
        i, row = next((i, row) for i, row in enumerate(csv.reader(f)) if len(row[0].split()) >= 20)
    hit = real.match(FILLER.format(row[0]))
    assert (hit.benchmark, hit.item) == ("mmlu", f"college_medicine:{i}")


def test_case_and_punctuation_do_not_hide_overlap(real):
    record = read_jsonl("benchmarks/medqa/us_5_options_test.jsonl")[7]
    mangled = re.sub(r"[.,;:()-]", " ", record["question"]).upper().replace(" ", "  ")
    assert real.match(FILLER.format(mangled)).item == "7"


def test_ordinary_abstracts_are_not_flagged(real):
    """None of the reference abstracts is flagged: the file shares no PMID with PubMedQA, and no 13-gram
    with any benchmark (measured on all 26,925; 8-grams would flag 2.9% on chance phrases)."""
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt") as f:
        records = [json.loads(line) for _, line in zip(range(2000), f)]
    flagged = [r for r in records if real.match(f"{r['title'] or ''}\n\n{r['abstract'] or ''}", pmid=r["pmid"])]
    assert len(flagged) / len(records) < 0.005
