"""Duplicate resolution (precedence, deletions, near duplicates) and mixture sampling, on synthetic keys."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datatrove.data import Document

from medfoundry.config import validate
from medfoundry.corpus.config import CorpusConfig, DedupConfig
from medfoundry.corpus.dedup import DedupRange, Layout
from medfoundry.corpus.fingerprint import MinHasher, exact_key
from medfoundry.corpus.mix import BINS, Selection, cut_bin, hash_bins, plan_factors, take_in_bin, unit_hash
from medfoundry.corpus.ngrams import word_hashes
from medfoundry.corpus.resolve import resolve_round_one, resolve_round_two, write_entries
from medfoundry.corpus.steps import WriteTaskOutput
from medfoundry.errors import ConfigError, MedfoundryError
from medfoundry.io import iter_jsonl

BASE = (
    "Aspirin reduced the incidence of myocardial infarction in a randomized trial of 2,000 adults "
    "with stable angina followed for five years, with a modest increase in gastrointestinal bleeding "
    "that was mostly mild and resolved after the drug was stopped in every affected patient."
)


@dataclass
class _Docs:
    """docs: (id, source, pmid, text[, extra paper keys]); abstracts: row -> a full-text row's own abstract;
    orders: (file, line) of each row."""

    docs: list[tuple]
    ranks: dict[str, int]
    abstracts: dict[int, str]
    orders: list[tuple[int, int]]


def _table(docs: list[tuple], ranks: dict[str, int], abstracts: dict[int, str] | None = None) -> _Docs:
    return _Docs(docs, ranks, abstracts or {}, [(0, i) for i in range(len(docs))])


def resolve(table: _Docs, deletes, pubmed_sources: set[str], cfg: DedupConfig, ranges: int = 3) -> dict:
    """The dedup stage end to end on these documents: each one is an extract task's output (written by
    the extract writer), then both rounds' range tasks and resolutions run here. Returns
    ``{row: entry}`` with the entry's ``reason`` and ``detail`` as ``dropped.jsonl.gz`` has them."""
    hasher = MinHasher(cfg.near.num_perm, cfg.near.shingle_words, cfg.near.seed)
    signature = lambda text: hasher.signature(word_hashes(text))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        extract, work = Path(tmp) / "extract", Path(tmp) / "dedup"
        extract.mkdir()
        writer = WriteTaskOutput(str(extract), cfg.near)
        for task, (doc, order) in enumerate(zip(table.docs, table.orders)):
            keys = ([f"pmid:{doc[2]}"] if doc[2] else []) + list(doc[4] if len(doc) > 4 else [])
            meta = {"source": doc[1], "meta": {}, "pmid": doc[2], "paper_keys": keys, "order": list(order)}
            meta.update(exact=exact_key(doc[3]), minhash=signature(doc[3]))
            if task in table.abstracts:
                meta["abstract_minhash"] = signature(table.abstracts[task])
            list(writer.run([Document(doc[3], doc[0], metadata=meta)], rank=task))
        events = [
            Document("", f"pubmed/delete:{pmid}", metadata={"event": "delete", "pmid": pmid, "order": list(order)})
            for pmid, order in deletes
        ]
        list(writer.run(events, rank=len(table.docs)))
        sources = [d[1] for d in table.docs] + ["pubmed"]
        layout = Layout(
            np.array([1] * len(table.docs) + [0]),
            np.array([table.ranks.get(s, 0) for s in sources]),
            np.array([s in pubmed_sources for s in sources]),
        )
        for round_ in (1, 2) if cfg.near.enabled else (1,):
            for r in range(ranges):
                list(DedupRange(str(extract), str(work), round_, ranges, layout.to_json(), cfg).run(None, r, ranges))
            if round_ == 1:
                removed = resolve_round_one(work, ranges, layout, cfg)
            else:
                resolve_round_two(work, ranges, layout, removed)
        write_entries(work / "entries.jsonl.gz", extract, layout, sources, removed)
        entries = list(iter_jsonl(work / "entries.jsonl.gz"))
    return {row: SimpleNamespace(**entry) for row, entry in zip(sorted(removed), entries)}


def test_exact_and_near_duplicates_keep_the_highest_precedence_source():
    near = BASE.replace("five years", "six years")
    other = "An entirely different study of vitamin D supplementation and bone density in older women " * 3
    table = _table(
        [
            ("abstracts/1", "abstracts", None, BASE),
            ("papers/A", "papers", None, BASE.upper() + "  "),  # same text up to case/whitespace
            ("replay/x", "replay", None, near),
            ("abstracts/2", "abstracts", None, other),
        ],
        {"papers": 0, "abstracts": 1, "replay": 2},
    )
    removed = resolve(table, [], set(), DedupConfig())
    assert removed[0].reason == "exact_duplicate" and "papers/A" in removed[0].detail
    assert removed[2].reason == "near_duplicate" and "papers/A" in removed[2].detail
    assert 1 not in removed and 3 not in removed


def test_result_does_not_depend_on_the_number_of_key_ranges():
    near = BASE.replace("five years", "six years")
    table = _table(
        [
            ("pubmed/1", "pubmed", "1", "old version " + BASE),
            ("papers/A", "papers", "1", BASE.upper()),
            ("abstracts/x", "abstracts", None, near, ["doi:10.1/x"]),
            ("replay/y", "replay", None, BASE + " extra words at the end of it"),
            ("abstracts/x", "abstracts", None, "a different text with the same id " * 9),
            ("abstracts/z", "abstracts", None, "unrelated text about bone density in older women " * 5, ["doi:10.1/x"]),
            ("replay/e", "replay", None, BASE.lower()),
            ("pubmed/9", "pubmed", "9", "citation nine " * 20),
        ],
        {"papers": 0, "pubmed": 1, "abstracts": 2, "replay": 3},
    )
    results = [resolve(table, [("9", (9, 0))], {"pubmed"}, DedupConfig(), ranges=n) for n in (1, 2, 5, 16)]
    assert all(r == results[0] for r in results[1:])
    assert {row: r.reason for row, r in results[0].items()} == {
        0: "same_paper",
        2: "same_paper",
        3: "near_duplicate",
        6: "exact_duplicate",
        7: "deleted_citation",
    }


def test_near_dedup_threshold_is_respected():
    different = (
        BASE.replace("Aspirin reduced", "Clopidogrel did not change")
        .replace("mild", "severe")
        .replace("angina", "disease")
    )
    table = _table([("a/1", "a", None, BASE), ("a/2", "a", None, different)], {"a": 0})
    assert resolve(table, [], set(), DedupConfig(near={"threshold": 0.9})) == {}


def test_same_paper_prefers_full_text_and_latest_version():
    table = _table(
        [
            ("pubmed/1", "pubmed", "111", "old version " + BASE),
            ("abstracts/1", "abstracts", "111", "abstract text of paper 111 " * 5),
            ("pubmed/1b", "pubmed", "111", "revised version of the same citation " * 5),
            ("papers/PMC1", "papers", "111", "the full text of the paper " * 20),
            ("pubmed/2", "pubmed", "222", "paper two " * 20),
            ("abstracts/2", "abstracts", "222", "another abstract of paper two " * 9),
        ],
        {"papers": 0, "pubmed": 1, "abstracts": 2},
    )
    removed = resolve(table, [], {"pubmed"}, DedupConfig(exact=False, near={"enabled": False}))
    assert sorted(removed) == [0, 1, 2, 5]
    assert all(r.reason == "same_paper" for r in removed.values())
    assert "papers/PMC1" in removed[0].detail and "pubmed/2" in removed[5].detail


def test_same_paper_within_pubmed_keeps_the_latest_version():
    table = _table(
        [("pubmed/7", "pubmed", "7", "first " * 30), ("pubmed/7", "pubmed", "7", "second " * 30)], {"pubmed": 0}
    )
    removed = resolve(table, [], {"pubmed"}, DedupConfig(exact=False, near={"enabled": False}))
    assert list(removed) == [0]


def test_delete_citation_removes_pmid_everywhere_unless_readded_later():
    table = _table(
        [
            ("pubmed/5", "pubmed", "5", "citation five " * 20),
            ("abstracts/5", "abstracts", "5", "abstract five " * 20),
            ("pubmed/6", "pubmed", "6", "citation six " * 20),
        ],
        {"pubmed": 0, "abstracts": 1},
    )
    table.orders = [(0, 0), (1, 0), (2, 5)]
    deletes = [("5", (0, 3)), ("6", (0, 4))]
    removed = resolve(table, deletes, {"pubmed"}, DedupConfig(same_paper=False, exact=False, near={"enabled": False}))
    assert {r: v.reason for r, v in removed.items()} == {0: "deleted_citation", 1: "deleted_citation"}


def _cfg(**sources_weights) -> CorpusConfig:
    return validate(
        CorpusConfig,
        {
            "output_dir": "x",
            "decontam": {"enabled": False},
            "sources": [{"name": n, "kind": "jsonl", "paths": ["p"], "weight": w} for n, w in sources_weights.items()],
        },
    )


def test_anchored_weights_size_the_replay_share():
    plans = plan_factors(
        _cfg(papers=None, abstracts=None, replay=0.01), {"papers": 600, "abstracts": 390, "replay": 5000}
    )
    assert plans["papers"].factor == 1 and plans["abstracts"].factor == 1
    assert plans["replay"].factor * 5000 == pytest.approx(10.0) and not plans["replay"].capped


def test_all_weighted_sizes_to_every_document_unless_max_repeat_binds():
    cfg = _cfg(a=0.5, b=0.5)
    plans = plan_factors(cfg, {"a": 1000, "b": 100})
    # using all of a would need b 10 times: max_repeat=4 binds, so a is downsampled and the shares stay 50/50
    assert plans["a"].factor == pytest.approx(0.4) and plans["b"].factor == pytest.approx(4.0)
    assert not plans["a"].capped and not plans["b"].capped
    cfg.mix.max_repeat = 20
    plans = plan_factors(cfg, {"a": 1000, "b": 100})
    assert plans["a"].factor == pytest.approx(1.0) and plans["b"].factor == pytest.approx(10.0)


def test_weighted_source_without_documents_is_an_error():
    with pytest.raises(MedfoundryError, match="replay"):
        plan_factors(_cfg(papers=None, replay=0.01), {"papers": 100, "replay": 0})


def test_weights_are_validated():
    with pytest.raises(ConfigError, match="sum below 1"):
        _cfg(a=None, b=0.6, c=0.5)
    with pytest.raises(ConfigError, match="sum to 1"):
        _cfg(a=0.3, b=0.3)


def copies_for(rows, ids, chars, factor, seed):
    """The streamed selection of mix.py on one group held in memory."""
    hashes = np.array([unit_hash(seed, ids[r]) for r in rows])
    histogram = np.bincount(hash_bins(hashes), weights=chars[rows], minlength=BINS)
    b, taken, budget = cut_bin(factor, histogram)
    selection = Selection(math.floor(factor))
    if b >= 0:
        hit = hash_bins(hashes) == b
        selection = Selection(
            math.floor(factor), b, take_in_bin(taken, budget, hashes[hit], rows[hit], chars[rows][hit])
        )
    return selection.copies(hashes, rows)


def _sorted_reference(rows, ids, chars, factor, seed):
    """The definition: whole copies, then documents in hash order until one would overshoot."""
    whole = math.floor(factor)
    copies = np.full(len(rows), whole, dtype=np.int64)
    budget, taken = (factor - whole) * chars[rows].sum(), 0.0
    for i in sorted(range(len(rows)), key=lambda i: unit_hash(seed, ids[rows[i]])) if budget > 0 else []:
        if taken + chars[rows[i]] / 2 > budget:
            break
        copies[i] += 1
        taken += chars[rows[i]]
    return copies


def test_streamed_selection_equals_the_sorted_definition():
    rng = np.random.default_rng(1)
    for n, factor, seed in ((3000, 0.37, 1), (50, 2.5, 2), (20000, 0.001, 3), (7, 0.99, 4), (400, 3.0, 5)):
        chars = rng.integers(1, 5000, size=n)
        rows = np.sort(rng.choice(n * 2, size=n, replace=False))
        ids = {int(r): f"doc-{r}" for r in rows}
        full = np.zeros(n * 2, dtype=np.int64)
        full[rows] = chars
        assert np.array_equal(
            copies_for(rows, ids, full, factor, seed), _sorted_reference(rows, ids, full, factor, seed)
        )


def test_copies_hit_the_character_budget_deterministically():
    rng = np.random.default_rng(0)
    chars = rng.integers(100, 2000, size=500)
    rows = np.arange(500)
    ids = [f"d{i}" for i in range(500)]
    for factor in (0.3, 1.0, 2.7):
        copies = copies_for(rows, ids, chars, factor, seed=7)
        achieved = (copies * chars).sum() / chars.sum()
        assert abs(achieved - factor) <= chars.max() / chars.sum()
        assert np.array_equal(copies, copies_for(rows, ids, chars, factor, seed=7))
        assert copies.min() >= int(factor)
    assert not np.array_equal(copies_for(rows, ids, chars, 0.5, seed=7), copies_for(rows, ids, chars, 0.5, seed=8))


def test_near_duplicate_clusters_do_not_chain():
    """A~B and B~C above the threshold, A~C below it: B goes (copy of A), C stays."""
    words = [f"w{i}" for i in range(400)]
    a = " ".join(words[:300])
    b = " ".join(words[20:320])
    c = " ".join(words[40:340])
    table = _table([("s/a", "s", None, a), ("s/b", "s", None, b), ("s/c", "s", None, c)], {"s": 0})
    removed = resolve(table, [], set(), DedupConfig(near={"threshold": 0.8}))
    assert list(removed) == [1] and "s/a" in removed[1].detail


def test_same_paper_by_doi_and_pmcid():
    table = _table(
        [
            ("papers/PMC9", "papers", None, "the full text " * 30, ["doi:10.1371/journal.pone.1", "pmcid:PMC9"]),
            ("abstracts/x", "abstracts", None, "an abstract " * 20, ["doi:10.1371/journal.pone.1"]),
            ("pubmed/5", "pubmed", "5", "a citation " * 20, ["pmcid:PMC9"]),
        ],
        {"papers": 0, "pubmed": 1, "abstracts": 2},
    )
    removed = resolve(table, [], {"pubmed"}, DedupConfig(exact=False, near={"enabled": False}))
    assert sorted(removed) == [1, 2] and all("papers/PMC9" in r.detail for r in removed.values())


def test_abstract_without_ids_is_matched_to_its_paper_by_content():
    """An abstracts-only record with no PMID is dropped when a full-text paper's own abstract matches it."""
    paper_abstract = BASE + " " + BASE.replace("Aspirin", "The drug")
    paper = "# Title\n\n" + paper_abstract + "\n\n## Methods\n\n" + "Patients were enrolled at three sites. " * 40
    table = _table(
        [
            ("papers/PMC1", "papers", None, paper),
            ("abstracts/f.jsonl:7", "abstracts", None, paper_abstract),
            ("abstracts/f.jsonl:8", "abstracts", None, "Unrelated work on bone density in older women. " * 8),
        ],
        {"papers": 0, "abstracts": 1},
        abstracts={0: paper_abstract},
    )
    removed = resolve(table, [], set(), DedupConfig())
    assert list(removed) == [1] and removed[1].reason == "same_paper" and "papers/PMC1" in removed[1].detail


def test_duplicate_ids_keep_the_first_in_read_order():
    table = _table([("s/1", "s", None, "first text " * 30), ("s/1", "s", None, "second text " * 30)], {"s": 0})
    removed = resolve(table, [], set(), DedupConfig())
    assert list(removed) == [1] and removed[1].reason == "duplicate_id"


def test_choice_follows_read_order_not_row_order():
    """Rows come in task order; which duplicate survives depends only on (file, line)."""
    table = _table([("s/late", "s", None, BASE), ("s/early", "s", None, BASE)], {"s": 0})
    table.orders = [(0, 50), (0, 3)]
    removed = resolve(table, [], set(), DedupConfig())
    assert list(removed) == [0] and "s/early" in removed[0].detail


def test_anchored_weight_beyond_max_repeat_is_reported_short():
    plans = plan_factors(_cfg(papers=None, replay=0.5), {"papers": 1000, "replay": 100})
    assert plans["replay"].factor == 4.0 and plans["replay"].capped  # 10 copies wanted, 4 allowed
