"""The generator and the scorer of ``benchmarks/corpus_scale.py``: background documents that share no
shingles, near copies at their Jaccard levels, and precision/recall on a hand-made list of removals."""

from __future__ import annotations

import gzip
import json
import sys
from itertools import combinations
from xml.sax.saxutils import unescape

import numpy as np
import pytest

from conftest import REPO, shared
from medfoundry.corpus.ngrams import words

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark modules import each other by name
import corpus_scale as cs


@pytest.fixture(scope="module")
def pool():
    return cs.TextPool(shared("corpus/pubmed_abstracts.jsonl.gz"), limit=4000)


def _shingle_set(text: str) -> set[tuple[str, ...]]:
    """5-word shingles as tuples of words: independent of the benchmark's hashing."""
    w = words(text)
    return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_background_documents_share_no_shingles(pool):
    docs = pool.render(*pool.documents(np.random.default_rng(1), 300))
    texts = [f"{title}\n\n{abstract}" for title, abstract in docs]
    assert all(len(t) >= 200 and len(words(t)) >= 20 for t in texts)
    sets = [_shingle_set(t) for t in texts]
    values = [_jaccard(a, b) for a, b in combinations(sets, 2)]
    assert max(values) < 0.15
    assert np.mean(values) < 0.002


def test_generated_corpus_holds_its_plants(pool, tmp_path):
    made = cs.generate(tmp_path, 3000, seed=3, pool=pool)
    records = {}
    for path in sorted((tmp_path / "abstracts").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                records[f"abstracts/{r['id']}"] = r
    papers = sorted((tmp_path / "papers").glob("*.xml"))
    assert len(records) + len(papers) == 3000
    truth = json.loads(gzip.decompress((tmp_path / "truth.json.gz").read_bytes()))["plants"]
    assert truth == made["truth"]
    counts = cs.plan_counts(3000)
    kinds = [p["kind"] for p in truth]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "exact": counts["exact"],
        "near": counts["near"] * len(cs.LEVELS),
        "same_pmid": counts["same_pmid"],
        "same_doi": counts["same_doi"],
        "full_text": counts["full_text"],
    }
    all_ids = [i for p in truth for i in p["ids"]]
    assert len(all_ids) == len(set(all_ids))  # no document in two plants

    def text(r):
        return "\n\n".join(p for p in (r["title"], r["abstract"]) if p)

    for p in truth:
        a = records[p["ids"][0]]
        if p["kind"] == "near":
            b = records[p["ids"][1]]
            true = _jaccard(_shingle_set(text(a)), _shingle_set(text(b)))
            assert true == pytest.approx(p["jaccard"], abs=1e-3)
            assert p["level"] <= true + 1e-9 and abs(true - p["level"]) <= 0.05, p
        elif p["kind"] == "exact":
            b = records[p["ids"][1]]
            assert words(text(a)) == words(text(b)) and text(a) != text(b)
        elif p["kind"] == "same_pmid":
            b = records[p["ids"][1]]
            assert a["pmid"] and a["pmid"] == b["pmid"] and a["id"] != b["id"]
        elif p["kind"] == "same_doi":
            b = records[p["ids"][1]]
            assert a["doi"] and a["doi"].lower() == b["doi"].lower()
        else:
            assert a["pmid"] is None and a["doi"] is None
            xml = (tmp_path / "papers" / (p["ids"][1].split("/")[1] + ".xml")).read_text()
            title = unescape(xml.split("<article-title>")[1].split("</article-title>")[0])
            assert title == a["title"]


def _kept(reason: str, removed: str, kept: str, stage: str = "dedup") -> dict:
    detail = f"the abstract of {kept} (estimated Jaccard 0.97)" if kept.startswith("papers/") else f"kept {kept}"
    if reason == "near_duplicate":
        detail += " (estimated Jaccard 0.91)"
    return {
        "id": removed,
        "source": removed.split("/")[0],
        "pmid": None,
        "stage": stage,
        "reason": reason,
        "detail": detail,
    }


def test_scorer_counts_hits_misses_and_false_positives():
    truth = [
        {"kind": "near", "level": 0.9, "jaccard": 0.90, "ids": ["a/1", "a/2"]},  # found: TP
        {"kind": "near", "level": 0.85, "jaccard": 0.87, "ids": ["a/3", "a/4"]},  # missed
        {"kind": "near", "level": 0.8, "jaccard": 0.82, "ids": ["a/5", "a/6"]},  # found: TP, not in recall
        {"kind": "near", "level": 0.7, "jaccard": 0.70, "ids": ["a/7", "a/8"]},  # found: FP (below 0.8)
        {"kind": "near", "level": 0.95, "jaccard": 0.95, "ids": ["a/9", "a/10"]},  # original removed: TP
        {"kind": "exact", "ids": ["a/11", "a/12"]},  # found
        {"kind": "same_pmid", "ids": ["a/13", "a/14"]},  # found (the earlier one removed)
        {"kind": "same_doi", "ids": ["a/15", "a/16"]},  # wrong reason: not found, and an FP
        {"kind": "full_text", "ids": ["a/17", "papers/PMC1"]},  # found
        {"kind": "exact", "ids": ["a/18", "a/19"]},  # a/18 dropped by cleaning: left out
    ]
    dropped = [
        _kept("near_duplicate", "a/2", "a/1"),
        _kept("near_duplicate", "a/6", "a/5"),
        _kept("near_duplicate", "a/8", "a/7"),
        _kept("near_duplicate", "a/9", "a/10"),
        _kept("near_duplicate", "a/50", "a/51"),  # two background documents: FP
        _kept("exact_duplicate", "a/12", "a/11"),
        _kept("same_paper", "a/13", "a/14"),
        _kept("near_duplicate", "a/16", "a/15"),
        _kept("same_paper", "a/17", "papers/PMC1"),
        {"id": "a/18", "source": "a", "pmid": None, "stage": "clean", "reason": "too_short", "detail": ""},
        _kept("duplicate_id", "a/60", "a/61"),
    ]
    s = cs.score(truth, dropped, threshold=0.8)
    assert s["near_dup_recall"] == pytest.approx(2 / 3)  # a/1-2 and a/9-10 of the three >= 0.85
    assert s["near_dup_precision"] == pytest.approx(3 / 6)
    assert s["near_false_positives"] == 3
    assert s["planted_exact_found"] == pytest.approx(3 / 4)
    assert s["found_by_kind"]["same_doi"] == {"found": 0, "planted": 1}
    assert s["planted_dropped_before_dedup"] == 1
    assert s["near_by_level"]["0.85"] == {"pairs": 1, "removed": 0, "mean_true_jaccard": 0.87}
    # the kept document must be the partner: a removal naming another document is an FP
    other = [*dropped[:1], _kept("near_duplicate", "a/4", "a/51")]
    s = cs.score(truth[:2], other, threshold=0.8)
    assert s["near_dup_recall"] == 1.0 and s["near_dup_precision"] == 0.5
    # the full text's abstract must be removed as the article's: naming another article is a miss
    s = cs.score(truth[8:9], [_kept("same_paper", "a/17", "papers/PMC2")], threshold=0.8)
    assert s["planted_exact_found"] == 0.0


def test_summary_takes_the_largest_stage_and_worst_scores():
    def size(peak: float, rate: float, recall: float) -> dict:
        stages = {s: {"seconds": 1.0, "peak_rss_mb": peak if s == "finalize" else 100.0, "tasks": 1} for s in cs.STAGES}
        scores = {"near_dup_recall": recall, "near_dup_precision": 1.0, "planted_exact_found": 1.0}
        return {"stages": stages, "docs_per_s": rate, "scores": scores}

    s = cs.summarize({1000: size(500, 100, 0.97), 5000: size(600, 95, 0.96)}, True, False, 10.0)
    assert (s["max_stage"], s["max_stage_rss_mb"], s["rss_growth"]) == ("finalize", 600, 1.2)
    assert s["docs_per_s_ratio"] == 0.95 and s["near_dup_recall"] == 0.96
    assert all(s["targets_met"].values())
    s = cs.summarize({1000: size(500, 100, 0.97), 5000: size(700, 80, 0.9)}, False, False, 10.0)
    assert not any(s["targets_met"][k] for k in ("rss_growth", "docs_per_s_ratio", "near_dup_recall"))
