"""Typed configuration of ``medfoundry corpus build``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medfoundry.config import BENCHMARKS_ENV, StrictModel, benchmarks_dir_from_env
from medfoundry.executor import ExecutorConfig

SourceKind = Literal["pubmed_xml", "jats", "guidelines", "jsonl", "parquet", "arrow", "text"]
RECORD_KINDS = ("jsonl", "parquet", "arrow")  # records mapped onto documents by a FieldMap


class FieldMap(StrictModel):
    """How a generic JSONL record (or a Parquet or Arrow row) maps onto a document.

    ``text`` lists fields joined with a blank line (e.g. ``[title, abstract]``); missing or null
    fields are left out. ``meta`` lists fields copied into the document's metadata.
    """

    text: list[str] = Field(default_factory=lambda: ["text"])
    id: str | None = None
    meta: list[str] = Field(default_factory=list)
    pmid: str | None = Field(None, description="field holding a PubMed id, for same-paper dedup and decontamination")
    doi: str | None = Field(None, description="field holding a DOI, for same-paper dedup")


class SourceConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: SourceKind
    paths: list[str] = Field(
        min_length=1, description="files or glob patterns; arrow: folders written by datasets' save_to_disk"
    )
    weight: float | None = Field(
        None, gt=0, le=1, description="target share of train characters; unset = take every document once"
    )
    fields: FieldMap = Field(default_factory=FieldMap, description="jsonl, parquet and arrow sources")
    split: str | None = Field(
        None, description="arrow: the split to read of a DatasetDict folder (one with dataset_dict.json)"
    )
    keep_without_abstract: bool = Field(False, description="pubmed_xml: keep records that have only a title")
    captions: bool = Field(True, description="jats: keep figure and table captions")

    @field_validator("paths")
    @classmethod
    def _no_empty(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("empty path")
        return v

    @model_validator(mode="after")
    def _options_fit_kind(self) -> SourceConfig:
        for option, kinds in _KIND_OPTIONS.items():
            if option in self.model_fields_set and self.kind not in kinds:
                raise ValueError(f"{option!r} applies to kind {' and '.join(kinds)} sources, not {self.kind!r}")
        return self


_KIND_OPTIONS = {
    "fields": RECORD_KINDS,
    "split": ("arrow",),
    "keep_without_abstract": ("pubmed_xml",),
    "captions": ("jats",),
}


class CleanConfig(StrictModel):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    remove_urls: bool = True
    remove_bracket_refs: bool = True
    remove_boilerplate: bool = True
    min_chars: int = Field(200, ge=0)
    max_chars: int = Field(2_000_000, gt=0)
    min_words: int = Field(20, ge=0)
    language: str | None = Field("en", description="ISO 639-1 code to keep; null disables the filter")
    language_threshold: float = Field(0.5, ge=0, le=1)


class NearDedupConfig(StrictModel):
    enabled: bool = True
    shingle_words: int = Field(5, ge=1)
    num_perm: int = Field(128, ge=8)
    bands: int = Field(16, ge=1)
    threshold: float = Field(0.8, gt=0, le=1)
    seed: int = 1

    @model_validator(mode="after")
    def _bands_divide(self) -> NearDedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class DedupConfig(StrictModel):
    exact: bool = True
    near: NearDedupConfig = Field(default_factory=NearDedupConfig)
    same_paper: bool = Field(
        True, description="documents sharing a PMID are one paper: keep the highest-precedence one"
    )
    precedence: list[str] = Field(
        default_factory=list,
        description="source names, best first; a duplicate is kept in the earliest. Unlisted sources come last, "
        "in config order",
    )
    task_memory_mb: int = Field(
        128,
        ge=16,
        description="memory budget of one dedup task: the key records are split into as many ranges as it takes",
    )


class DecontamConfig(StrictModel):
    enabled: bool = True
    benchmarks_dir: str | None = Field(
        None, description=f"folder laid out like ../shared/data/benchmarks; default ${BENCHMARKS_ENV} while enabled"
    )
    ngram: int = Field(13, ge=4)
    min_matches: int = Field(1, ge=1, description="remove a document with at least this many overlapping n-grams")
    pubmedqa_ids: bool = True
    sets: list[Literal["pubmedqa", "medqa", "medmcqa", "mmlu"]] = Field(
        default_factory=lambda: ["pubmedqa", "medqa", "medmcqa", "mmlu"]
    )

    @model_validator(mode="before")
    @classmethod
    def _benchmarks_from_env(cls, data):
        """``$MEDFOUNDRY_BENCHMARKS`` stands in for the folder only while decontamination is enabled: a disabled
        step's config (and its recipe stage's key) stays the same whatever the variable says."""
        if isinstance(data, dict) and data.get("enabled", True) is not False:
            return benchmarks_dir_from_env(data)
        return data


class MixConfig(StrictModel):
    seed: int = 1234
    max_repeat: float = Field(4.0, ge=1, description="no source is repeated more than this many times")
    total_chars: int | None = Field(
        None, gt=0, description="size of the train split; default: as large as the weights allow"
    )


class SplitConfig(StrictModel):
    val_fraction: float = Field(0.01, ge=0, lt=1)
    seed: int = 0


class OutputConfig(StrictModel):
    shard_docs: int = Field(20_000, gt=0)
    compresslevel: int = Field(6, ge=1, le=9)


class CorpusConfig(StrictModel):
    output_dir: str
    work_dir: str | None = Field(None, description="intermediate files; default OUTPUT_DIR/.work")
    workers: int = Field(0, ge=0, description="parallel tasks; 0 = one per CPU core")
    strict: bool = Field(True, description="fail on the first bad input; false = skip and report it")
    split_mb: float = Field(
        16.0,
        gt=0,
        description="JSONL files (and Parquet files, by row group) larger than this are read by several tasks",
    )
    sources: list[SourceConfig] = Field(min_length=1)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    report_tokenizer: str | None = Field(
        None,
        description="tokenizer directory (tokenizer.json, or vocab.json + merges.txt) or .gguf file: report the "
        "mixture in tokens too",
    )

    @model_validator(mode="after")
    def _check_sources(self) -> CorpusConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        unknown = [n for n in self.dedup.precedence if n not in names]
        if unknown:
            raise ValueError(f"dedup.precedence names unknown sources {unknown}; sources are {names}")
        if self.decontam.enabled and not self.decontam.benchmarks_dir:
            raise ValueError(
                "decontam.benchmarks_dir is required while decontam.enabled is true: point it (or the "
                f"{BENCHMARKS_ENV} environment variable) at the evaluation sets (e.g. ../shared/data/benchmarks), "
                "or set decontam.enabled: false"
            )
        weights = [s.weight for s in self.sources if s.weight is not None]
        anchored = len(weights) < len(self.sources)
        if anchored and sum(weights) >= 1:
            raise ValueError(
                "weights of weighted sources must sum below 1 when some sources have no weight "
                f"(those are taken whole); got {sum(weights):.3f}"
            )
        if anchored and self.mix.total_chars:
            raise ValueError(
                "mix.total_chars needs every source to have a weight (unweighted sources are taken whole "
                "and fix the size themselves)"
            )
        if not anchored and abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"when every source has a weight they must sum to 1; got {sum(weights):.6f}")
        return self

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output_dir) / ".work"

    def source_rank(self) -> dict[str, int]:
        """Precedence rank of each source (0 = best)."""
        order = list(self.dedup.precedence) + [s.name for s in self.sources if s.name not in self.dedup.precedence]
        return {name: i for i, name in enumerate(order)}
