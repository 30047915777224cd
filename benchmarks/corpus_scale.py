"""The corpus build and tokenization at scale (issue 17): a synthetic corpus of N documents made from the
shared PubMed abstracts, with duplicates of known kinds planted in it, built with 2 local workers and
tokenized with the GPT-2 tokenizer; time, each stage's peak memory and how well dedup finds the plants.

The corpus. Every background document is a mosaic of sentences drawn at random from the 27k shared
abstracts (so the sentence order is shuffled), with 15% of its whitespace tokens replaced by words drawn
from the abstracts by frequency; its first sentence is the title. Two background documents share next to
no 5-word shingle (Jaccard ~0). Sentences holding anything the cleaning stage would change (URLs, bracket
citations, copyright notices, entities, XML debris) are left out of the pool, so the words dedup sees are
the words written.
The documents go into ``abstracts/part-*.jsonl.gz`` (50,000 a file, ``{id, pmid, doi, title, abstract}``;
80% carry a PMID, 30% a DOI) and ``papers/*.xml`` (small JATS full texts). Planted, each on its own
background document (the *original*, never used by two plants), with the fraction of N each kind takes:

- ``exact`` (1%): a copy that differs only in case, commas and spacing, or with the title moved into
  the abstract field; another id, its own PMID if any. Expected: one of the two removed as
  ``exact_duplicate``, naming the other.
- ``near`` (0.4% per level): a copy with tokens substituted at random positions and its tail truncated
  so that its true Jaccard with the original (5-word shingles of ``medfoundry.corpus.ngrams.words``,
  what MinHash estimates) is at or just above the level (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95): the
  generator makes as many substitutions, then drops as many trailing tokens (about one shingle each), as
  it can without going below the level. Originals of near copies are 250-450 tokens long, so the true
  Jaccard lands within 0.005 of the level for 99% of copies (0.02 at most seen). It is recorded.
  Planting the 0.8 level at or just above the default threshold makes its removals true positives and its
  misses no recall loss: the estimate's noise at the threshold counts neither for nor against dedup.
- ``same_pmid`` / ``same_doi`` (0.5% each): another background text carrying the original's PMID (DOI,
  upper-cased in half the pairs: DOIs compare case-insensitively). Expected: one removed as
  ``same_paper`` naming the other.
- ``full_text`` (0.05% of N, at least 20): a JATS article (``papers`` source, a PMCID and no other id;
  best in ``dedup.precedence``) whose title and abstract are those of an abstracts document that has no
  PMID or DOI, and whose body is other background text. Expected: the abstracts document removed as
  ``same_paper`` naming the article.

The ground truth (``truth.json.gz``, beside the corpus's inputs, never read by the build) lists each
plant: kind, ids ``[original, copy]`` (for ``full_text``: ``[abstract document, article]``), level and true
Jaccard.

Scores, from ``OUTPUT_DIR/dropped.jsonl.gz`` (the id a removal names is parsed from its ``detail``:
``kept <id> ...`` or ``the abstract of <id> ...``). A plant with a document dropped before dedup (by
cleaning: never expected) is left out of every score and counted in ``planted_dropped_before_dedup``.

- ``near_dup_recall``: over planted near pairs whose true Jaccard is >= 0.85, the fraction where the
  original or the copy is removed with reason ``near_duplicate``.
- ``near_dup_precision``: over every ``near_duplicate`` removal of the build, the fraction where the
  removed document and the kept one its detail names are a planted near pair whose true Jaccard is >= the
  configured threshold (0.8 by default). Anything else (two background documents, a pair planted below the
  threshold, a removal naming a third document) is a false positive.
- ``planted_exact_found``: over the planted ``exact``, ``same_pmid``, ``same_doi`` and ``full_text``
  plants, the fraction whose expected removal (above) is there with the expected reason and names the
  expected kept document.

Per N, the build is ``medfoundry corpus build`` (workers 2, decontamination off, every other setting
default) and ``medfoundry tokenize`` (workers 2), each in its own process; wall seconds cover both (not
the generation), documents/s is N over them. Each stage's seconds, peak RSS (max over the stage's
processes) and task count come from the manifests: ``details["stages"]`` of the corpus's (extract, dedup,
finalize, mix, write) and ``details["stages"]["tokenize"]`` of the tokens'. At the smallest N the corpus is
built and tokenized again with 1 worker and every output file (train/val parts, dropped.jsonl.gz, token
``.bin`` and ``.idx.npy`` shards) compared byte for byte.

The last line is one JSON object: ``sizes`` (per N: wall_s, docs_per_s, stages, scores, counts), and the
summary over the sizes run: ``max_stage_rss_mb`` (the largest stage peak at the largest N), ``rss_growth``
(that peak over the same stage's peak at the smallest N; ``rss_growth_by_stage`` has every stage's),
``docs_per_s_ratio`` (largest N's rate over the smallest N's), ``near_dup_recall``, ``near_dup_precision``
and ``planted_exact_found`` (worst over sizes), ``identical_across_workers``; ``targets`` and
``targets_met`` (every stage's peak at the largest N <= 2000 MB and <= 1.3x its peak at the smallest N).
Default sizes: 200,000 and 1,000,000; ``--quick``: 50,000 and 250,000 (target: under 15 minutes here).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import xxhash
import yaml

from medfoundry.corpus.ngrams import ngram_hashes, word_hashes, words

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ABSTRACTS = DATA / "corpus" / "pubmed_abstracts.jsonl.gz"
GPT2 = DATA / "tokenizers" / "gpt2"

SIZES = (200_000, 1_000_000)
QUICK_SIZES = (50_000, 250_000)
LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
FRACTION = {"exact": 0.01, "near": 0.004, "same_pmid": 0.005, "same_doi": 0.005, "full_text": 0.0005}
MIN_FULL_TEXTS = 20
SUBSTITUTION = 0.15  # share of a background document's tokens replaced
DOC_TOKENS = (100, 300)  # background document length, whitespace tokens
NEAR_TOKENS = (250, 450)  # originals of near copies: long enough for fine Jaccard steps
SHINGLE = 5  # the build's default dedup.near.shingle_words
DOCS_PER_FILE = 50_000
RECALL_MIN_JACCARD = 0.85
SOURCE, PAPERS = "abstracts", "papers"
CORPUS_STAGES = ("extract", "dedup", "finalize", "mix", "write")
STAGES = (*CORPUS_STAGES, "tokenize")
TARGETS = {
    "max_stage_rss_mb": 2000,
    "rss_growth": 1.3,
    "docs_per_s_ratio": 0.9,
    "near_dup_recall": 0.95,
    "near_dup_precision": 0.99,
    "planted_exact_found": 1.0,
    "identical_across_workers": True,
}
QUICK_WALL_S = 900
# Sentences holding any of these are left out: the cleaning stage would change them (URLs and the empty
# brackets they leave, citation brackets, notices, entities, control characters, XML debris, NLM's
# "UNLABELLED"), and then the text dedup sees would not be the text whose Jaccard is recorded.
_UNSAFE = re.compile(
    r"https?:|www\.|[\[\]&©\ufffd\x00-\x1f\x7f-\x9f\u00ad\u200b\ufeff]|\(\s*[,;]?\s*\)|=\"|xmlns|UNLABELLED"
    r"|\(c\)|opyright|Published|rights reserved|TRUNCATED|SUPPLEMENT|PsycINFO|Editors' Summary"
)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z0-9(])")
_WORD_TOKEN = re.compile(r"[a-z]{2,}")
_DETAIL_ID = re.compile(r"^(?:kept|the abstract of) (\S+)")


# --- text ------------------------------------------------------------------------------------------


class TextPool:
    """The shared abstracts as sentences of whitespace tokens: a token vocabulary, one flat int32 array of
    token ids, each sentence's start and length, and the word tokens to draw substitutions from."""

    def __init__(self, path: Path = ABSTRACTS, limit: int | None = None):
        vocab: dict[str, int] = {}
        flat: list[int] = []
        starts: list[int] = []
        for n, record in enumerate(_read_jsonl(path)):
            if limit is not None and n >= limit:
                break
            text = " ".join(p for p in (record.get("title"), record.get("abstract")) if p)
            pending: list[str] = []
            for sentence in _SENTENCE_END.split(text):
                tokens = sentence.split()
                if _UNSAFE.search(sentence):
                    pending = []
                    continue
                pending += tokens
                if len(pending) > 80:  # no sentence ends (tokenized sources): not a sentence
                    pending = []
                elif len(pending) >= 6:  # "e.g." and "vs." split sentences: short pieces join the next
                    starts.append(len(flat))
                    flat += [vocab.setdefault(t, len(vocab)) for t in pending]
                    pending = []
        self.vocab = np.array(list(vocab), dtype=object)
        self.tokens = np.array(flat, dtype=np.int32)
        self.starts = np.array(starts, dtype=np.int64)
        self.lengths = np.diff(np.r_[self.starts, len(self.tokens)])
        is_word = np.array([bool(_WORD_TOKEN.fullmatch(t)) for t in self.vocab])
        self.word_tokens = self.tokens[is_word[self.tokens]]  # drawn uniformly = by frequency
        self._words: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def token_shingles(self, ids: np.ndarray) -> np.ndarray:
        """:func:`shingles` of the text of these tokens, from each token's words hashed once: 6x faster than
        reading the text, for the searches of :func:`near_copy`. (Equal to :func:`shingles` of the text
        unless NFKC joins characters across a space; the Jaccard recorded is always the text's.)"""
        if self._words is None:
            lists = [words(t) for t in self.vocab.tolist()]
            index: dict[str, int] = {}
            flat = np.array([index.setdefault(w, len(index)) for ws in lists for w in ws], dtype=np.int64)
            hashes = np.array([xxhash.xxh64_intdigest(w.encode()) for w in index], dtype=np.uint64)
            counts = np.array([len(ws) for ws in lists], dtype=np.int64)
            self._words = (hashes[flat], np.r_[0, np.cumsum(counts)[:-1]], counts)
        hashes, starts, counts = self._words
        sizes = counts[ids]
        ends = np.cumsum(sizes)
        positions = np.repeat(starts[ids] - (ends - sizes), sizes) + np.arange(int(ends[-1]) if len(ends) else 0)
        return _distinct(ngram_hashes(hashes[positions], SHINGLE))

    def draw_words(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.word_tokens[rng.integers(0, len(self.word_tokens), n)]

    def documents(
        self, rng: np.random.Generator, n: int, length=DOC_TOKENS
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` mosaics of random sentences with substituted tokens: (flat token ids, each document's start
        (n+1 values), each document's title length). A title is the first sentence."""
        k = 32  # candidate sentences per document; the shortest ones need about 25
        sentences = rng.integers(0, len(self.starts), size=(n, k))
        lengths = self.lengths[sentences]
        target = rng.integers(length[0], length[1], size=n)
        count = np.minimum((np.cumsum(lengths, axis=1) < target[:, None]).sum(axis=1) + 1, k)
        chosen = sentences[np.arange(k)[None, :] < count[:, None]]  # row-major: each document's in order
        sizes = self.lengths[chosen]
        ends = np.cumsum(sizes)
        positions = np.repeat(self.starts[chosen] - (ends - sizes), sizes) + np.arange(int(ends[-1]))
        tokens = self.tokens[positions]
        swap = rng.random(len(tokens)) < SUBSTITUTION
        tokens[swap] = self.draw_words(rng, int(swap.sum()))
        doc_sizes = np.add.reduceat(sizes, np.r_[0, np.cumsum(count)[:-1]])
        return tokens, np.r_[0, np.cumsum(doc_sizes)], lengths[:, 0]

    def render(self, tokens: np.ndarray, starts: np.ndarray, titles: np.ndarray) -> list[tuple[str, str]]:
        """(title, abstract) strings of documents laid out as :meth:`documents` returns them."""
        strings = self.vocab[tokens].tolist()
        out = []
        for i, title in enumerate(titles.tolist()):
            a, b = int(starts[i]), int(starts[i + 1])
            out.append((" ".join(strings[a : a + title]), " ".join(strings[a + title : b])))
        return out

    def text(self, ids: np.ndarray, title: int) -> str:
        """The text the build reads from a record of these tokens: title and abstract joined by a blank line."""
        strings = self.vocab[ids].tolist()
        return " ".join(strings[:title]) + "\n\n" + " ".join(strings[title:])


def _read_jsonl(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def shingles(text: str, n: int = SHINGLE) -> np.ndarray:
    """The distinct n-word shingles of ``text`` (uint64 hashes over ``medfoundry.corpus.ngrams.words``)."""
    return _distinct(ngram_hashes(word_hashes(text), n))


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique, without its overhead on small arrays)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sets given as sorted arrays of distinct values."""
    if not len(a) or not len(b):
        return 1.0 if len(a) == len(b) else 0.0
    common = int((b[np.minimum(np.searchsorted(b, a), len(b) - 1)] == a).sum())
    return common / (len(a) + len(b) - common)


def near_copy(
    pool: TextPool, rng: np.random.Generator, ids: np.ndarray, title: int, level: float
) -> tuple[np.ndarray, float]:
    """A copy of the document ``ids`` (title = its first ``title`` tokens) with true shingle Jaccard at or
    just above ``level``: as many token substitutions as keep it >= level (searched from an estimate, over a
    random order of positions outside the title and the last 60 tokens), then as many dropped trailing
    tokens as keep it >= level (each drops about one shingle). Returns the copy's ids and its true Jaccard."""
    original = pool.token_shingles(ids)
    tail = 60
    positions = title + rng.permutation(len(ids) - title - tail)  # the title stays: it reads as the same paper
    replacements = pool.draw_words(rng, len(positions))

    def edited(k: int, cut: int) -> np.ndarray:
        copy = ids.copy()
        copy[positions[:k]] = replacements[:k]
        return copy[: len(copy) - cut]

    def largest(hi: int, guess: int, ok) -> int:
        """The largest x in [0, hi] with ok(x), ok(0) being true (Jaccard falls as x grows): from ``guess``,
        steps of growing size bracket it, then bisection."""
        lo, guess, step = 0, min(max(guess, 1), hi), 2
        if hi == 0:
            return 0
        if ok(guess):
            lo = guess
            while lo + step <= hi and ok(lo + step):
                lo, step = lo + step, 2 * step
            hi = min(hi, lo + step - 1)
        else:
            hi = guess - 1
            while hi - step >= lo and not ok(hi - step):
                hi, step = hi - step - 1, 2 * step
            lo = max(lo, hi - step)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    # each substitution removes about 5 shingles of n, and J = c / (2n - c) for c shared of n each
    guess = round(len(ids) * (1 - (2 * level / (1 + level)) ** (1 / SHINGLE)))
    k = largest(len(positions), guess, lambda x: jaccard(original, pool.token_shingles(edited(x, 0))) >= level)
    cut = largest(tail - 5, 3, lambda x: jaccard(original, pool.token_shingles(edited(k, x))) >= level)
    copy = edited(k, cut)
    return copy, jaccard(shingles(pool.text(ids, title)), shingles(pool.text(copy, title)))


def exact_variant(title: str, abstract: str, kind: int) -> tuple[str | None, str]:
    """The same words (``exact_key`` equal) written differently: lower case, commas and spacing, or the
    title moved into the abstract field."""
    if kind == 0:
        return title.lower(), abstract.lower()
    if kind == 1:
        return title.replace(", ", " "), abstract.replace(", ", "  ,").replace(". ", ".   ")
    return None, f"{title} {abstract}"


def _jats(pmcid: int, title: str, abstract: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<sec><title>{escape(h)}</title><p>{escape(p)}</p></sec>" for h, p in sections)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<article article-type="research-article">'
        f'<front><article-meta><article-id pub-id-type="pmc">{pmcid}</article-id>'
        f"<title-group><article-title>{escape(title)}</article-title></title-group>"
        f"<abstract><p>{escape(abstract)}</p></abstract></article-meta></front><body>{body}</body></article>\n"
    )


# --- the corpus --------------------------------------------------------------------------------------


def plan_counts(n: int) -> dict[str, int]:
    """How many plants of each kind a corpus of ``n`` documents holds (``near``: per level)."""
    counts = {kind: round(frac * n) for kind, frac in FRACTION.items()}
    counts["full_text"] = max(MIN_FULL_TEXTS, counts["full_text"])
    return counts


def generate(out: Path, n: int, seed: int = 0, pool: TextPool | None = None) -> dict:
    """Write the corpus of ``n`` documents into ``out/abstracts``, ``out/papers`` and its ground truth into
    ``out/truth.json.gz``; returns ``{"documents", "plants", "seconds", "truth"}``."""
    started = time.perf_counter()
    pool = pool or TextPool()
    rng = np.random.default_rng(seed)
    counts = plan_counts(n)
    pair_kinds = ["exact"] * counts["exact"] + ["same_pmid"] * counts["same_pmid"] + ["same_doi"] * counts["same_doi"]
    levels = [lv for lv in LEVELS for _ in range(counts["near"])]
    pair_kinds += ["near"] * len(levels)
    slots = n - counts["full_text"]  # records of the abstracts source; the rest are JATS articles
    pairs, full_texts = len(pair_kinds), counts["full_text"]
    if 2 * pairs + full_texts > slots:
        raise ValueError(f"n={n} is too small for its plants")
    order = rng.permutation(slots)
    originals, copies, abstract_slots = order[:pairs], order[pairs : 2 * pairs], order[2 * pairs :][:full_texts]

    pmids = np.where(rng.random(slots) < 0.8, 30_000_000 + np.arange(slots), 0)
    dois = rng.random(slots) < 0.3
    doi_of = {int(s): f"10.5555/mf.{s}" for s in np.flatnonzero(dois)}
    fixed: dict[int, dict] = {}  # slot -> record fields set by a plant
    truth: list[dict] = []

    def doc_id(slot: int) -> str:
        return f"{SOURCE}/d{slot:07d}"

    # exact copies and full texts' abstracts: normal documents
    exact = [i for i, kind in enumerate(pair_kinds) if kind == "exact"]
    plain = pool.render(*pool.documents(rng, len(exact) + full_texts))
    for j, i in enumerate(exact):
        original, copy = int(originals[i]), int(copies[i])
        title, abstract = plain[j]
        variant = exact_variant(title, abstract, j % 3)
        if words(" ".join(filter(None, variant))) != words(f"{title} {abstract}"):
            variant = exact_variant(title, abstract, 2)
        fixed[original] = {"title": title, "abstract": abstract}
        fixed[copy] = {"title": variant[0], "abstract": variant[1]}
        truth.append({"kind": "exact", "ids": [doc_id(original), doc_id(copy)]})
    papers_dir = out / PAPERS
    papers_dir.mkdir(parents=True, exist_ok=True)
    bodies = pool.render(*pool.documents(rng, 3 * full_texts))
    headings = ("Introduction", "Methods", "Results", "Discussion")
    for j, slot in enumerate(abstract_slots.tolist()):
        title, abstract = plain[len(exact) + j]
        fixed[slot] = {"title": title, "abstract": abstract, "pmid": None, "doi": None}
        pmcid = 9_000_000 + j
        sections = [(headings[s], " ".join(bodies[3 * j + s])) for s in range(3)]
        (papers_dir / f"PMC{pmcid}.xml").write_text(_jats(pmcid, title, abstract, sections), encoding="utf-8")
        truth.append({"kind": "full_text", "ids": [doc_id(slot), f"{PAPERS}/PMC{pmcid}"]})

    # near copies: long originals, the copy edited down to its level
    near = [i for i, kind in enumerate(pair_kinds) if kind == "near"]
    tokens, starts, titles = pool.documents(rng, len(near), NEAR_TOKENS)
    for j, i in enumerate(near):
        original, copy = int(originals[i]), int(copies[i])
        ids, title = tokens[starts[j] : starts[j + 1]], int(titles[j])
        copied, value = near_copy(pool, rng, ids, title, levels[j])
        for slot, these in ((original, ids), (copy, copied)):
            strings = pool.vocab[these].tolist()
            fixed[slot] = {"title": " ".join(strings[:title]), "abstract": " ".join(strings[title:])}
        truth.append(
            {"kind": "near", "level": levels[j], "jaccard": round(value, 4), "ids": [doc_id(original), doc_id(copy)]}
        )

    # same paper by id: the second document is other text with the original's PMID or DOI
    for i, kind in enumerate(pair_kinds):
        original, copy = int(originals[i]), int(copies[i])
        if kind == "same_pmid":
            pmids[original] = 30_000_000 + original
            fixed[copy] = {"pmid": str(pmids[original])}
        elif kind == "same_doi":
            doi_of[original] = f"10.5555/mf.{original}"
            fixed[copy] = {"doi": doi_of[original].upper() if i % 2 else doi_of[original]}
        else:
            continue
        truth.append({"kind": kind, "ids": [doc_id(original), doc_id(copy)]})

    abstracts_dir = out / SOURCE
    abstracts_dir.mkdir(parents=True, exist_ok=True)
    for first in range(0, slots, DOCS_PER_FILE):
        count = min(DOCS_PER_FILE, slots - first)
        texts = pool.render(*pool.documents(rng, count))
        path = abstracts_dir / f"part-{first // DOCS_PER_FILE:04d}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
            for slot, (title, abstract) in enumerate(texts, first):
                record = {"id": f"d{slot:07d}", "pmid": str(pmids[slot]) if pmids[slot] else None}
                record |= {"doi": doi_of.get(slot), "title": title, "abstract": abstract}
                record |= fixed.get(slot, {})
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    with gzip.open(out / "truth.json.gz", "wt", encoding="utf-8") as fh:
        json.dump({"n": n, "seed": seed, "counts": counts, "plants": truth}, fh)
    return {"documents": n, "plants": len(truth), "seconds": time.perf_counter() - started, "truth": truth}


# --- scores --------------------------------------------------------------------------------------------


def score(truth: list[dict], dropped: list[dict], threshold: float, recall_min: float = RECALL_MIN_JACCARD) -> dict:
    """Near-duplicate recall and precision and the share of planted exact and same-paper duplicates found,
    as the module docstring defines them, from the ground truth and the build's ``dropped.jsonl.gz``."""
    removed = {}
    lost = set()
    for entry in dropped:
        if entry.get("stage") == "dedup":
            match = _DETAIL_ID.match(entry.get("detail") or "")
            removed[entry["id"]] = (entry["reason"], match.group(1) if match else None)
        else:
            lost.add(entry["id"])
    planted = [p for p in truth if not lost.intersection(p["ids"])]

    near = [p for p in planted if p["kind"] == "near"]
    pair_jaccard = {frozenset(p["ids"]): p["jaccard"] for p in near}
    wanted = [p for p in near if p["jaccard"] >= recall_min]
    found = [p for p in wanted if any(removed.get(i, ("",))[0] == "near_duplicate" for i in p["ids"])]
    removals = [(i, kept) for i, (reason, kept) in removed.items() if reason == "near_duplicate"]
    true_pos = sum(pair_jaccard.get(frozenset((i, kept)), -1.0) >= threshold for i, kept in removals)

    expected = {"exact": "exact_duplicate", "same_pmid": "same_paper", "same_doi": "same_paper"}
    by_kind: dict[str, list[int]] = {}
    for p in planted:
        if p["kind"] == "near":
            continue
        a, b = p["ids"]
        if p["kind"] == "full_text":
            ok = removed.get(a) == ("same_paper", b)
        else:
            reason = expected[p["kind"]]
            ok = removed.get(a) == (reason, b) or removed.get(b) == (reason, a)
        by_kind.setdefault(p["kind"], [0, 0])
        by_kind[p["kind"]][0] += ok
        by_kind[p["kind"]][1] += 1
    hits, total = sum(v[0] for v in by_kind.values()), sum(v[1] for v in by_kind.values())

    levels = {}
    for p in near:
        entry = levels.setdefault(str(p["level"]), {"pairs": 0, "removed": 0, "jaccard_sum": 0.0})
        entry["pairs"] += 1
        entry["removed"] += any(removed.get(i, ("",))[0] == "near_duplicate" for i in p["ids"])
        entry["jaccard_sum"] += p["jaccard"]
    return {
        "near_dup_recall": len(found) / len(wanted) if wanted else None,
        "near_dup_precision": true_pos / len(removals) if removals else None,
        "planted_exact_found": hits / total if total else None,
        "near_pairs_for_recall": len(wanted),
        "near_removals": len(removals),
        "near_false_positives": len(removals) - int(true_pos),
        "found_by_kind": {k: {"found": v[0], "planted": v[1]} for k, v in sorted(by_kind.items())},
        "near_by_level": {
            lv: {
                "pairs": e["pairs"],
                "removed": e["removed"],
                "mean_true_jaccard": round(e["jaccard_sum"] / e["pairs"], 4),
            }
            for lv, e in sorted(levels.items())
        },
        "planted_dropped_before_dedup": len(truth) - len(planted),
    }


# --- build ---------------------------------------------------------------------------------------------


def corpus_config(inputs: Path, out: Path, workers: int) -> dict:
    return {
        "output_dir": str(out / "corpus"),
        "work_dir": str(out / "work"),
        "workers": workers,
        "sources": [
            {"name": PAPERS, "kind": "jats", "paths": [str(inputs / PAPERS / "*.xml")]},
            {
                "name": SOURCE,
                "kind": "jsonl",
                "paths": [str(inputs / SOURCE / "*.jsonl.gz")],
                "fields": {"text": ["title", "abstract"], "id": "id", "pmid": "pmid", "doi": "doi"},
            },
        ],
        "dedup": {"precedence": [PAPERS, SOURCE]},
        "decontam": {"enabled": False},
    }


def _run(stage: list[str], config: dict, out: Path, name: str) -> float:
    """``medfoundry STAGE CONFIG`` in a child process; its wall seconds. Exits with the log's tail on failure."""
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = out / f"{name}.log"
    started = time.perf_counter()
    with open(log, "wb") as fh:
        done = subprocess.run([sys.executable, "-m", "medfoundry", *stage, str(path)], cwd=REPO, stdout=fh, stderr=fh)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name}: medfoundry {' '.join(stage)} failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    return seconds


def build(inputs: Path, out: Path, workers: int) -> dict:
    """Build and tokenize the corpus of ``inputs`` into ``out/corpus`` and ``out/tokens``; seconds of each."""
    out.mkdir(parents=True, exist_ok=True)
    build_s = _run(["corpus", "build"], corpus_config(inputs, out, workers), out, "corpus")
    tokens = {"corpus_dir": str(out / "corpus"), "tokenizer_dir": str(GPT2), "output_dir": str(out / "tokens")}
    tokenize_s = _run(["tokenize"], {**tokens, "workers": workers}, out, "tokenize")
    return {"build_s": build_s, "tokenize_s": tokenize_s}


def stage_stats(out: Path) -> dict[str, dict]:
    """Seconds, peak RSS (MB) and tasks of every stage, from the corpus and tokens manifests."""
    corpus = json.loads((out / "corpus" / "manifest.json").read_text())
    tokens = json.loads((out / "tokens" / "manifest.json").read_text())
    stages = dict(corpus.get("details", {}).get("stages") or {})
    tokenize = (tokens.get("details", {}).get("stages") or {}).get("tokenize")
    if tokenize is not None:
        stages["tokenize"] = tokenize
    missing = [s for s in STAGES if s not in stages or "peak_rss_mb" not in stages[s] or "seconds" not in stages[s]]
    if missing:
        sys.exit(
            f"the manifests of {out} do not report the stages {missing}: corpus/manifest.json needs "
            f"details.stages.{{{','.join(CORPUS_STAGES)}}} and tokens/manifest.json details.stages.tokenize, each "
            "{seconds, peak_rss_mb, tasks} (issue 17); this build does not write them yet"
        )
    return {s: {k: stages[s].get(k) for k in ("seconds", "peak_rss_mb", "tasks")} for s in STAGES}


def read_dropped(corpus_dir: Path) -> list[dict]:
    return list(_read_jsonl(corpus_dir / "dropped.jsonl.gz"))


def compared_files(out: Path) -> list[str]:
    """Output files that must not depend on the worker count, relative to ``out``."""
    names = ["corpus/dropped.jsonl.gz"]
    for pattern in ("corpus/train/*", "corpus/val/*", "tokens/*/part-*.bin", "tokens/*/part-*.idx.npy"):
        names += sorted(str(p.relative_to(out)) for p in out.glob(pattern))
    return names


def same_outputs(a: Path, b: Path) -> tuple[bool, list[str]]:
    """Whether two builds wrote the same files, byte for byte; the names that differ or exist in one only."""
    names_a, names_b = compared_files(a), compared_files(b)
    differ = sorted(set(names_a) ^ set(names_b))
    for name in sorted(set(names_a) & set(names_b)):
        if not _same_file(a / name, b / name):
            differ.append(name)
    return not differ, differ


def _same_file(x: Path, y: Path) -> bool:
    if x.stat().st_size != y.stat().st_size:
        return False
    with open(x, "rb") as fx, open(y, "rb") as fy:
        while True:
            bx, by = fx.read(1 << 20), fy.read(1 << 20)
            if bx != by:
                return False
            if not bx:
                return True


def _machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
    mem = Path("/proc/meminfo").read_text().split()[1] if Path("/proc/meminfo").exists() else "0"
    return {"cpu_model": model or platform.processor(), "cores": os.cpu_count(), "mem_gb": round(int(mem) / 2**20, 1)}


def summarize(sizes: dict[int, dict], identical: bool, quick: bool, wall_s: float) -> dict:
    """The summary keys over the sizes run, with the targets and whether each is met."""
    small, large = sizes[min(sizes)], sizes[max(sizes)]
    peaks = {s: large["stages"][s]["peak_rss_mb"] for s in STAGES}
    top = max(peaks, key=peaks.get)
    growth = {s: round(peaks[s] / small["stages"][s]["peak_rss_mb"], 3) for s in STAGES}

    def worst(key: str):
        values = [r["scores"][key] for r in sizes.values()]
        return None if None in values else min(values)

    summary = {
        "max_stage_rss_mb": round(peaks[top], 1),
        "max_stage": top,
        "rss_growth": growth[top],
        "rss_growth_by_stage": growth,
        "docs_per_s_ratio": round(large["docs_per_s"] / small["docs_per_s"], 3),
        "near_dup_recall": worst("near_dup_recall"),
        "near_dup_precision": worst("near_dup_precision"),
        "planted_exact_found": worst("planted_exact_found"),
        "identical_across_workers": identical,
    }
    targets = dict(TARGETS)
    met = {
        "max_stage_rss_mb": all(v <= TARGETS["max_stage_rss_mb"] for v in peaks.values()),
        "rss_growth": all(v <= TARGETS["rss_growth"] for v in growth.values()),  # every stage
        "docs_per_s_ratio": summary["docs_per_s_ratio"] >= TARGETS["docs_per_s_ratio"],
        "identical_across_workers": identical,
    }
    for key in ("near_dup_recall", "near_dup_precision", "planted_exact_found"):
        met[key] = summary[key] is not None and summary[key] >= TARGETS[key]
    if quick:
        targets["wall_s"] = QUICK_WALL_S
        met["wall_s"] = wall_s <= QUICK_WALL_S
    return {**summary, "targets": targets, "targets_met": met}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 50,000 and 250,000 (else 200,000 and 1,000,000)")
    parser.add_argument("--sizes", default=None, help="comma-separated N to run instead, e.g. 20000,100000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the corpora and builds (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora, builds and token shards")
    args = parser.parse_args()
    for needed in (ABSTRACTS, GPT2):
        if not needed.exists():
            sys.exit(f"needs {needed} (the shared data folder)")
    sizes = sorted(int(s) for s in args.sizes.split(",")) if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    from medfoundry.corpus.config import NearDedupConfig

    threshold = NearDedupConfig().threshold
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="corpus_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[int, dict] = {}
    identical, differ = False, []
    try:
        pool = TextPool()
        print(f"text pool: {len(pool.starts):,} sentences, {len(pool.vocab):,} token types", flush=True)
        for n in sizes:
            inputs, out = work / f"n{n}" / "inputs", work / f"n{n}" / "workers2"
            shutil.rmtree(work / f"n{n}", ignore_errors=True)  # a kept earlier run would be resumed, not rebuilt
            made = generate(inputs, n, args.seed, pool)
            print(f"N={n:,}: generated {made['plants']:,} plants in {made['seconds']:.0f} s", flush=True)
            seconds = build(inputs, out, workers=2)
            wall = seconds["build_s"] + seconds["tokenize_s"]
            stages = stage_stats(out)
            scores = score(made["truth"], read_dropped(out / "corpus"), threshold)
            manifest = json.loads((out / "corpus" / "manifest.json").read_text())
            tokens = json.loads((out / "tokens" / "manifest.json").read_text())
            results[n] = {
                "wall_s": round(wall, 1),
                "build_s": round(seconds["build_s"], 1),
                "tokenize_s": round(seconds["tokenize_s"], 1),
                "generate_s": round(made["seconds"], 1),
                "docs_per_s": round(n / wall, 1),
                "stages": stages,
                "docs_out": manifest["counts"].get("documents_train", 0) + manifest["counts"].get("documents_val", 0),
                "tokens": tokens.get("counts", {}),
                "scores": scores,
            }
            peak = max(stages[s]["peak_rss_mb"] for s in STAGES)
            shown = {k: f"{scores[k]:.4f}" if scores[k] is not None else "-" for k in TARGETS if k in scores}
            print(
                f"N={n:,}: {wall:.0f} s ({n / wall:.0f} docs/s), largest stage peak {peak:.0f} MB, near recall "
                f"{shown['near_dup_recall']}, precision {shown['near_dup_precision']}, exact found "
                f"{shown['planted_exact_found']}",
                flush=True,
            )
            if n == sizes[0]:
                single = work / f"n{n}" / "workers1"
                build(inputs, single, workers=1)
                identical, differ = same_outputs(out, single)
                print(f"N={n:,}: 1 and 2 workers {'identical' if identical else f'differ in {differ[:5]}'}", flush=True)
                if not args.keep:
                    shutil.rmtree(single)
            if not args.keep:
                shutil.rmtree(work / f"n{n}")
    finally:
        if not args.keep:  # only what this run made: a --work folder may hold other things
            for n in sizes:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    wall_s = time.perf_counter() - started
    result = {
        "sizes": {str(n): r for n, r in results.items()},
        **summarize(results, identical, args.quick, wall_s),
        "differing_files": differ[:20],
        "threshold": threshold,
        "seconds": round(wall_s, 1),
        "machine": _machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
