"""The extract stage as datatrove pipeline steps: read -> clean/filter -> decontaminate -> fingerprint -> write.

Task ``rank`` processes work unit ``units[rank]`` (see ``plan.py``). Documents are never dropped
silently inside a task: filters mark ``metadata["drop"]`` and the writer records every marked
document, reader skip and PubMed deletion in the task's ledger, which the finalize stage and the
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

from medfoundry.corpus.clean import QualityFilter, TextCleaner
from medfoundry.corpus.config import CleanConfig, DecontamConfig, NearDedupConfig, SourceConfig
from medfoundry.corpus.decontam import BenchmarkIndex
from medfoundry.corpus.fingerprint import MinHasher, exact_key
from medfoundry.corpus.ngrams import word_hashes
from medfoundry.corpus.plan import WorkUnit
from medfoundry.corpus.readers.base import Deletion, ReadContext
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


INDEX_KEYS = ("id", "source", "pmid", "paper_keys", "exact", "order")


class WriteTaskOutput(PipelineStep):
    """Writes ``{rank}.docs.jsonl.gz`` (kept documents), ``{rank}.index.json`` (their dedup keys),
    ``{rank}.minhash.npy`` (+ ``abstract_minhash.npy`` of full-text papers' own abstracts) and
    ``{rank}.ledger.jsonl.gz`` (drops, skips, deletions)."""

    name = "write task output"
    type = "💽 - WRITER"

    def __init__(self, out_dir: str, num_perm: int):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.num_perm = num_perm

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        stem = self.out_dir / f"{rank:05d}"
        index = {key: [] for key in INDEX_KEYS + ("chars", "abstract_rows")}
        signatures: dict[str, list] = {"minhash": [], "abstract_minhash": []}
        with (
            atomic_open(f"{stem}.docs.jsonl.gz", compresslevel=1) as docs,
            atomic_open(f"{stem}.ledger.jsonl.gz") as ledger,
        ):
            for doc in data:
                with self.track_time():
                    self._write(doc, docs, ledger, index, signatures)
        for name, rows in signatures.items():
            with atomic_path(f"{stem}.{name}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.stack(rows) if rows else np.zeros((0, self.num_perm), np.uint32))
        with atomic_open(f"{stem}.index.json") as fh:
            json.dump(index, fh)
        return
        yield  # a generator: datatrove drains every step

    def _write(self, doc: Document, docs, ledger, index: dict, signatures: dict) -> None:
        md = doc.metadata
        if "drop" in md or "event" in md:
            entry = {"id": doc.id, "source": md.get("source"), "pmid": md.get("pmid"), "order": md.get("order")}
            entry.update(md.get("drop") or {"event": md["event"]})
            ledger.write(json.dumps(entry, ensure_ascii=False) + "\n")
            return
        docs.write(
            json.dumps({"id": doc.id, "text": doc.text, "source": md["source"], "meta": md["meta"]}, ensure_ascii=False)
            + "\n"
        )
        if "abstract_minhash" in md:
            index["abstract_rows"].append(len(index["id"]))
            signatures["abstract_minhash"].append(md["abstract_minhash"])
        for key in INDEX_KEYS:
            index[key].append(doc.id if key == "id" else md.get(key))
        index["chars"].append(len(doc.text))
        if "minhash" in md:
            signatures["minhash"].append(md["minhash"])
        self.stat_update("kept")
