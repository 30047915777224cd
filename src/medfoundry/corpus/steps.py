"""The extract stage as datatrove pipeline steps: read -> clean/filter -> decontaminate -> fingerprint -> write.

Task ``rank`` processes work unit ``units[rank]`` (see ``plan.py``). Documents are never dropped
silently inside a task: filters mark ``metadata["drop"]`` and the writer records every marked
document, reader skip and PubMed deletion in the task's ledger, which the later stages and the
report read. Each task's outputs are written atomically, so a killed task leaves nothing that
looks finished and datatrove simply re-runs it.
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from medfoundry.corpus import keys
from medfoundry.corpus.clean import QualityFilter, TextCleaner
from medfoundry.corpus.config import CleanConfig, DecontamConfig, NearDedupConfig, SourceConfig
from medfoundry.corpus.decontam import BenchmarkIndex
from medfoundry.corpus.fingerprint import MinHasher, band_keys, exact_key
from medfoundry.corpus.ngrams import word_hashes
from medfoundry.corpus.plan import WorkUnit
from medfoundry.corpus.readers.base import Deletion, ReadContext
from medfoundry.corpus.readers.columnar import read_table
from medfoundry.corpus.readers.guidelines import read_guidelines
from medfoundry.corpus.readers.jats import read_jats
from medfoundry.corpus.readers.jsonl import read_jsonl, read_text
from medfoundry.corpus.readers.pubmed_xml import read_pubmed_xml
from medfoundry.io import atomic_open, atomic_path


def read_unit(unit: WorkUnit, source: SourceConfig, ctx: ReadContext):
    path = Path(unit.path)
    if source.kind == "pubmed_xml":
        # title-only citations are read and then dropped with a reason, never silently
        return read_pubmed_xml(path, ctx)
    if source.kind == "jats":
        return read_jats(path, ctx, captions=source.captions)
    if source.kind == "guidelines":
        return read_guidelines(path, ctx)
    if source.kind == "text":
        return read_text(path, ctx)
    if source.kind in ("parquet", "arrow"):
        return read_table(path, ctx, source.fields, unit.part, unit.parts)
    return read_jsonl(path, ctx, source.fields, unit.part, unit.parts)


def paper_keys(meta: dict) -> list[str]:
    """Identifiers that name the same paper across sources (DOIs compare case-insensitively)."""
    keys = []
    for name in ("pmid", "doi", "pmcid"):
        value = meta.get(name)
        if value not in (None, ""):
            keys.append(f"{name}:{str(value).strip().lower() if name == 'doi' else str(value).strip()}")
    return keys


def _drop(doc: Document, stage: str, reason: str, detail: str = "") -> None:
    doc.metadata["drop"] = {"stage": stage, "reason": reason, "detail": detail}


class ReadSources(PipelineStep):
    name = "read sources"
    type = "📖 - READER"

    def __init__(self, units: list[WorkUnit], sources: list[SourceConfig], strict: bool):
        super().__init__()
        self.units = units
        self.sources = {s.name: s for s in sources}
        self.strict = strict

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        unit = self.units[rank]
        ctx = ReadContext(Path(unit.path), strict=self.strict)
        source = self.sources[unit.source]
        items = read_unit(unit, source, ctx)
        for pos in itertools.count():
            with self.track_time():
                item = next(items, None)
            yield from self._skips(ctx, unit)
            if item is None:
                return
            order = [unit.file_index, item.line if item.line is not None else pos]
            if isinstance(item, Deletion):
                yield Document(
                    "",
                    f"{unit.source}/delete:{item.pmid}",
                    metadata={"event": "delete", "pmid": item.pmid, "source": unit.source, "order": order},
                )
                continue
            self.stat_update("read")
            local_id = (
                item.native_id
                if item.native_id is not None
                else f"{unit.label}:{item.line if item.line is not None else pos}"
            )
            pmid = item.meta.get("pmid")
            doc = Document(
                item.text,
                f"{unit.source}/{local_id}",
                metadata={
                    "source": unit.source,
                    "meta": item.meta,
                    "pmid": str(pmid) if pmid else None,
                    "paper_keys": paper_keys(item.meta),
                    "order": order,
                },
            )
            if item.meta.get("has_abstract") is False and not source.keep_without_abstract:
                _drop(doc, "read", "no_abstract", "title-only citation (sources[].keep_without_abstract: false)")
            yield doc

    def _skips(self, ctx: ReadContext, unit: WorkUnit):
        for skip in ctx.skips:
            self.stat_update("skipped_input")
            doc = Document("", f"{unit.source}/{unit.label}:{skip.line}", metadata={"source": unit.source})
            _drop(doc, "read", "invalid_input", f"{skip.path}:{skip.line or '-'}: {skip.reason}")
            yield doc
        ctx.skips.clear()


class _LiveDocStep(PipelineStep):
    """Applies ``process`` to documents that are neither dropped nor events."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if "drop" not in doc.metadata and "event" not in doc.metadata:
                with self.track_time():
                    self.process(doc)
            yield doc

    def process(self, doc: Document) -> None:
        raise NotImplementedError


class CleanAndFilter(_LiveDocStep):
    name = "clean and filter"
    type = "🔻 - FILTER"

    def __init__(self, cfg: CleanConfig):
        super().__init__()
        self.cleaner = TextCleaner(cfg)
        self.filter = QualityFilter(cfg)

    def process(self, doc: Document) -> None:
        doc.text = self.cleaner.clean(doc.text)
        verdict = self.filter.check(doc.text)
        if verdict:
            self.stat_update(verdict[0])
            _drop(doc, "filter", *verdict)


@lru_cache(maxsize=2)
def _cached_index(benchmarks_dir: str, sets: tuple[str, ...], ngram: int, pubmedqa_ids: bool) -> BenchmarkIndex:
    return BenchmarkIndex.build(Path(benchmarks_dir), list(sets), ngram, pubmedqa_ids)


def benchmark_index(cfg: DecontamConfig) -> BenchmarkIndex:
    """Built once per worker process, reused by every task that process runs."""
    return _cached_index(cfg.benchmarks_dir, tuple(cfg.sets), cfg.ngram, cfg.pubmedqa_ids)


class Decontaminate(_LiveDocStep):
    name = "decontaminate"
    type = "🔻 - FILTER"

    def __init__(self, cfg: DecontamConfig):
        super().__init__()
        self.cfg = cfg

    def process(self, doc: Document) -> None:
        words = doc.metadata["words"] = word_hashes(doc.text)
        hit = benchmark_index(self.cfg).match_words(words, doc.metadata.get("pmid"), self.cfg.min_matches)
        if hit:
            self.stat_update(hit.reason)
            _drop(doc, "decontaminate", hit.reason, hit.detail)


class Fingerprint(_LiveDocStep):
    name = "fingerprint"
    type = "🫂 - DEDUP"

    def __init__(self, cfg: NearDedupConfig, full_text_sources: set[str]):
        super().__init__()
        self.hasher = MinHasher(cfg.num_perm, cfg.shingle_words, cfg.seed) if cfg.enabled else None
        self.full_text_sources = full_text_sources

    def process(self, doc: Document) -> None:
        doc.metadata["exact"] = exact_key(doc.text)
        if self.hasher is None:
            return
        words = doc.metadata.pop("words", None)
        doc.metadata["minhash"] = self.hasher.signature(word_hashes(doc.text) if words is None else words)
        if doc.metadata["source"] in self.full_text_sources:
            # title + abstract: what the paper looks like in an abstracts-only source
            doc.metadata["abstract_minhash"] = self.hasher.signature(word_hashes(doc.text.split("\n## ", 1)[0]))


class WriteTaskOutput(PipelineStep):
    """Writes the task's kept documents (``{rank}.docs.jsonl.gz``), their columns for the later stages
    (``{rank}.index.json``: id, pmid, line, chars, and which rows are full-text papers), MinHash
    signatures (``{rank}.minhash.npy``, ``{rank}.abstract_minhash.npy`` for full-text papers' own
    abstracts), sorted dedup key records of every kind (``{rank}.{kind}.keys.npy``, see ``keys.py``) and
    the ledger of drops, skips and deletions (``{rank}.ledger.jsonl.gz``)."""

    name = "write task output"
    type = "💽 - WRITER"

    def __init__(self, out_dir: str, near: NearDedupConfig):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.near = near

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        stem = self.out_dir / f"{rank:05d}"
        task = _TaskColumns()
        with (
            atomic_open(f"{stem}.docs.jsonl.gz", compresslevel=1) as docs,
            atomic_open(f"{stem}.ledger.jsonl.gz") as ledger,
        ):
            for doc in data:
                with self.track_time():
                    self._write(doc, docs, ledger, task)
        with self.track_time():
            for kind, recs in task.key_records(rank, self.near).items():
                keys.write_sorted(keys.key_file(self.out_dir, rank, kind), recs)
            for name, rows in (("minhash", task.signatures), ("abstract_minhash", task.abstract_signatures)):
                with atomic_path(f"{stem}.{name}.npy") as tmp, open(tmp, "wb") as fh:
                    np.save(fh, np.stack(rows) if rows else np.zeros((0, self.near.num_perm), np.uint32))
            with atomic_open(f"{stem}.index.json") as fh:
                json.dump(task.index, fh)
        return
        yield  # a generator: datatrove drains every step

    def _write(self, doc: Document, docs, ledger, task: _TaskColumns) -> None:
        md = doc.metadata
        if "drop" in md or "event" in md:
            entry = {"id": doc.id, "source": md.get("source"), "pmid": md.get("pmid"), "order": md.get("order")}
            entry.update(md.get("drop") or {"event": md["event"]})
            ledger.write(json.dumps(entry, ensure_ascii=False) + "\n")
            if md.get("event") == "delete":
                task.deletes.append((md["pmid"], md["order"]))
            return
        docs.write(
            json.dumps({"id": doc.id, "text": doc.text, "source": md["source"], "meta": md["meta"]}, ensure_ascii=False)
            + "\n"
        )
        task.add(doc.id, md, len(doc.text))
        self.stat_update("kept")


class _TaskColumns:
    """What one extract task collects of its kept documents for the index and the key records."""

    def __init__(self):
        self.index: dict[str, list] = {"id": [], "pmid": [], "line": [], "chars": [], "abstract_rows": []}
        self.file_index = 0
        self.paper_keys: list[tuple[int, str]] = []
        self.exact: list[str] = []
        self.signatures: list[np.ndarray] = []
        self.abstract_signatures: list[np.ndarray] = []
        self.deletes: list[tuple[str, list[int]]] = []

    def add(self, doc_id: str, md: dict, chars: int) -> None:
        row = len(self.index["id"])
        self.file_index = md["order"][0]
        for name, value in (("id", doc_id), ("pmid", md.get("pmid")), ("line", md["order"][1]), ("chars", chars)):
            self.index[name].append(value)
        self.paper_keys += [(row, key) for key in md.get("paper_keys", ())]
        self.exact.append(md["exact"])
        if "minhash" in md:
            self.signatures.append(md["minhash"])
        if "abstract_minhash" in md:
            self.index["abstract_rows"].append(row)
            self.abstract_signatures.append(md["abstract_minhash"])

    def key_records(self, task: int, near: NearDedupConfig) -> dict[str, np.ndarray]:
        rows = np.arange(len(self.index["id"]))
        refs = keys.make_ref(task, rows)
        orders = keys.make_order(self.file_index, np.array(self.index["line"], dtype=np.uint64))
        out = {keys.ID: keys.records(*keys.text_keys(self.index["id"]), refs, orders)}
        out[keys.EXACT] = keys.records(*keys.text_keys(self.exact), refs, orders)
        paper_rows = np.array([r for r, _ in self.paper_keys], dtype=np.int64)
        out[keys.PAPER] = keys.records(
            *keys.text_keys([k for _, k in self.paper_keys]), refs[paper_rows], orders[paper_rows]
        )
        with_pmid = np.array([r for r, p in enumerate(self.index["pmid"]) if p], dtype=np.int64)
        pmids = [self.index["pmid"][r] for r in with_pmid.tolist()]
        out[keys.PMID] = keys.records(*keys.text_keys(pmids), refs[with_pmid], orders[with_pmid])
        delete_orders = np.array([keys.make_order(*o) for _, o in self.deletes], dtype=np.uint64)
        out[keys.DELETE] = keys.records(*keys.text_keys([p for p, _ in self.deletes]), 0, delete_orders)
        out[keys.BAND] = _band_records(self.signatures, near, refs, orders)
        papers = np.array(self.index["abstract_rows"], dtype=np.int64)
        out[keys.ABSTRACT_BAND] = _band_records(
            self.abstract_signatures, near, refs[papers], orders[papers], aux=np.arange(len(papers))
        )
        return out


def _band_records(signatures: list, near: NearDedupConfig, refs, orders, aux=None) -> np.ndarray:
    """One record per (document, band) with the band's key (which mixes in the band's number, so the
    records' band field stays 0); none when near dedup is off."""
    if not signatures:
        return keys.records(np.zeros(0, np.uint64), 0, 0, 0)
    band_key = band_keys(np.stack(signatures), near.bands)  # (docs, bands)
    bands = band_key.shape[1]
    return keys.records(
        band_key.reshape(-1),
        0,
        np.repeat(refs, bands),
        np.repeat(orders, bands),
        aux=0 if aux is None else np.repeat(aux, bands),
    )
