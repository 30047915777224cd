"""``medfoundry corpus build``: every stage on a datatrove executor (local or Slurm), memory bounded.

extract (a task per work unit; cached by a hash of everything it depends on)
    read -> clean/filter -> decontaminate -> fingerprint -> per-task docs, index, signatures, sorted keys, ledger
dedup (tasks over key ranges, two rounds) and finalize (this process, over candidates only): see dedup.py
mix (this process, one extract task at a time): train/val split and copies per document, see mix.py
write (a task per extract task, then a task per shard): shards, see write.py; then dropped.jsonl.gz,
    manifest and report. A killed build resumes: finished tasks of every stage are kept.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medfoundry import __version__
from medfoundry.corpus.config import CorpusConfig
from medfoundry.corpus.dedup import DedupRange, Layout, plan_ranges
from medfoundry.corpus.mix import assign_copies
from medfoundry.corpus.plan import WorkUnit, plan_units
from medfoundry.corpus.report import write_report
from medfoundry.corpus.resolve import Removed, resolve_round_one, resolve_round_two, write_alive, write_entries
from medfoundry.corpus.steps import (
    CleanAndFilter,
    Decontaminate,
    Fingerprint,
    ReadSources,
    WriteTaskOutput,
    benchmark_index,
)
from medfoundry.corpus.write import GatherShard, ScatterDocuments, merge_tallies, shard_names
from medfoundry.executor import StageRun, run_tasks
from medfoundry.io import atomic_open, folder_lock, iter_jsonl, naming_full_disk
from medfoundry.manifest import HashCache, Manifest, content_key, inputs_fingerprint
from medfoundry.runtime import peak_rss, release_free_memory, reset_peak_rss


def extract_pipeline(cfg: CorpusConfig, units: list[WorkUnit], out_dir: Path) -> list:
    """The datatrove pipeline of the extract stage; hand it to any datatrove executor."""
    steps = [ReadSources(units, cfg.sources, cfg.strict), CleanAndFilter(cfg.clean)]
    if cfg.decontam.enabled:
        steps.append(Decontaminate(cfg.decontam))
    full_text = {s.name for s in cfg.sources if s.kind == "jats"}
    steps += [Fingerprint(cfg.dedup.near, full_text), WriteTaskOutput(str(out_dir), cfg.dedup.near)]
    return steps


def _extract_key(cfg: CorpusConfig, units: list[WorkUnit], inputs: dict[str, str]) -> str:
    """Everything the extract tasks' output depends on, and nothing else (weights, paths already
    resolved into ``units``, and dedup thresholds only matter later). ``inputs`` holds the fingerprints
    of the source files and of the benchmarks decontamination reads."""
    sources = [s.model_dump(exclude={"weight", "paths"}) for s in cfg.sources]
    near = cfg.dedup.near.model_dump(include={"enabled", "shingle_words", "num_perm", "bands", "seed"})
    sections = cfg.model_dump(include={"clean", "decontam", "strict"})
    return content_key(__version__, [asdict(u) for u in units], inputs, sources, near, sections)


def _inputs(cfg: CorpusConfig, units: list[WorkUnit]) -> dict[str, str]:
    """Fingerprints of every source file and (decontaminating) of the benchmarks folder, by content: the
    digests are kept in the work folder, so unchanged inputs are read once."""
    benchmarks = cfg.decontam.benchmarks_dir if cfg.decontam.enabled else None
    with HashCache(cfg.work_path / "input_digests.json") as hashes:
        inputs = {path: inputs_fingerprint(path, hashes=hashes) for path in dict.fromkeys(u.path for u in units)}
        if benchmarks is not None and Path(benchmarks).is_dir():  # a missing one is reported by the decontam index
            inputs[benchmarks] = inputs_fingerprint(benchmarks, hashes=hashes)
    return inputs


@dataclass
class _Stages:
    """Seconds, peak resident memory (the largest of the stage's task processes and of this one) and
    task count of each stage of the build, for the manifest and the report."""

    table: dict[str, dict] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        release_free_memory()
        reset_peak_rss()
        started = time.perf_counter()
        runs: list[StageRun] = []
        yield runs
        entry = self.table.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0, "tasks": 0})
        entry["seconds"] += time.perf_counter() - started
        peaks = [r.peak_rss_mb for r in runs] + [(peak_rss() or 0) / 2**20]
        entry["peak_rss_mb"] = round(max([entry["peak_rss_mb"], *peaks]), 1)
        entry["tasks"] += sum(r.tasks for r in runs)


def _layout(cfg: CorpusConfig, units: list[WorkUnit], extract_dir: Path) -> Layout:
    ranks = cfg.source_rank()
    kinds = {s.name: s.kind for s in cfg.sources}
    rows = [len(json.loads((extract_dir / f"{t:05d}.index.json").read_text())["id"]) for t in range(len(units))]
    return Layout(
        np.array(rows, dtype=np.int64),
        np.array([ranks[u.source] for u in units], dtype=np.int64),
        np.array([kinds[u.source] == "pubmed_xml" for u in units], dtype=bool),
    )


def deduplicate(cfg: CorpusConfig, units: list[WorkUnit], extract_dir: Path, stages: _Stages) -> tuple[Path, Layout]:
    """The two dedup rounds on the executor, each followed by its resolution in this process; returns the
    folder holding ``kept.npy`` and the removals' part of ``dropped.jsonl.gz``, and the tasks' layout."""
    layout = _layout(cfg, units, extract_dir)
    ranges = plan_ranges(extract_dir, len(units), cfg.dedup.task_memory_mb)
    work = extract_dir / f"dedup-{content_key(cfg.dedup.model_dump(), cfg.source_rank(), ranges)}"
    removed: Removed = {}
    for round_ in (1, 2):
        if round_ == 2 and not cfg.dedup.near.enabled:
            break
        with stages.stage("dedup") as runs:
            step = DedupRange(str(extract_dir), str(work), round_, ranges, layout.to_json(), cfg.dedup)
            runs.append(_run(cfg, [step], ranges, work / f"logs-round{round_}", "dedup", "range"))
        with stages.stage("finalize"):
            if round_ == 1:
                removed = resolve_round_one(work, ranges, layout, cfg.dedup)
            else:
                resolve_round_two(work, ranges, layout, removed)
    with stages.stage("finalize"):
        write_alive(work / "kept.npy", layout, removed)
        write_entries(work / "dedup_drops.jsonl.gz", extract_dir, layout, [u.source for u in units], removed)
    return work, layout


def _run(cfg: CorpusConfig, pipeline: list, tasks: int, logs: Path, name: str, unit="task", outputs=None) -> StageRun:
    with naming_full_disk(logs.parent):
        return run_tasks(cfg.executor, pipeline, tasks, cfg.workers, logs, name, unit, outputs)


def _discard(folder: Path) -> None:
    """Remove a folder all at once as far as a rerun can tell: renamed first, then deleted."""
    if folder.exists():
        trash = folder.with_name(f".discard-{folder.name}")
        folder.rename(trash)
        shutil.rmtree(trash)


def _remove_leftovers(out_dir: Path, work: Path, extract_dir: Path) -> None:
    """Temporary files of a killed run: staging folders, half-written task outputs and the hidden
    temporary files of interrupted atomic writes (manifest, report, hash cache)."""
    for staging in out_dir.glob(".staging-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for tmp in (*extract_dir.glob(".*.tmp"), *out_dir.glob(".*.tmp"), *work.glob(".*.tmp")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _prune_other_extracts(work: Path, keep: Path) -> None:
    """Extract outputs of earlier configs are full copies of the documents: keep only the current one."""
    for old in work.glob("extract-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def write_splits(
    cfg: CorpusConfig, units: list[WorkUnit], extract_dir: Path, mix_dir: Path, names, staging: Path, key: str
):
    """Scatter every task's kept copies into shard pieces, then gather each shard (both on the executor)."""
    scratch = extract_dir / f"write-{key}"
    scatter = ScatterDocuments(str(extract_dir), str(mix_dir), str(scratch), names, cfg.mix.seed, cfg.report_tokenizer)
    runs = [_run(cfg, [scatter], len(units), scratch / "logs-scatter", "write")]
    gather = GatherShard(str(scratch), str(staging), names, len(units), cfg.mix.seed, cfg.output.compresslevel)
    shards = [staging / name for name in names]
    runs.append(_run(cfg, [gather], len(names), scratch / "logs-gather", "write", "shard", shards))
    return runs, merge_tallies(scratch, len(units)), scratch


def _write_dropped(path: Path, extract_dir: Path, tasks: int, parts: list[Path]) -> tuple[dict, list[dict]]:
    """``dropped.jsonl.gz``: the extract tasks' drops in task order, then the dedup and mix removals in
    row order, streamed. Returns the counts by stage/reason and source, and the drops the report lists."""
    by_reason: dict[str, Counter] = {}
    listed = []
    inputs = [extract_dir / f"{t:05d}.ledger.jsonl.gz" for t in range(tasks)] + parts
    with atomic_open(path) as out, tqdm(inputs, desc="finalize", unit="part", disable=None) as bar:
        for part in bar:
            for entry in iter_jsonl(part):
                if "event" in entry:  # a PubMed deletion, applied by dedup
                    continue
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                by_reason.setdefault(f"{entry['stage']}/{entry['reason']}", Counter())[entry["source"]] += 1
                if entry["stage"] in ("decontaminate", "read") and entry["reason"] != "no_abstract":
                    listed.append(entry)
    return {k: dict(v) for k, v in by_reason.items()}, listed


def build_corpus(cfg: CorpusConfig, force: bool = False) -> Manifest:
    """Build the corpus into ``cfg.output_dir``; returns its manifest. Nothing is redone when the output's
    manifest records the same key (inputs, extract settings and the rest of the config but the executor,
    workers and folders), unless ``force``.

    The build holds the lock of its output folder, and of its work folder when that is elsewhere,
    throughout: a second build on either fails at once, so what this one removes as leftovers (other
    builds' staging, temporary files, older extracts) is never a live build's."""
    start = time.perf_counter()
    units = plan_units(cfg)  # inputs that match no file fail here, before anything is locked or written
    out_dir, work = Path(cfg.output_dir), cfg.work_path
    with contextlib.ExitStack() as locks:
        for folder in (out_dir, work) if not work.resolve().is_relative_to(out_dir.resolve()) else (out_dir,):
            locks.enter_context(folder_lock(folder, "corpus build"))
        return _build(cfg, units, force, start)


def _build(cfg: CorpusConfig, units: list[WorkUnit], force: bool, start: float) -> Manifest:
    timings: dict[str, float] = {}
    out_dir = Path(cfg.output_dir)
    inputs = _inputs(cfg, units)
    extract_dir = cfg.work_path / f"extract-{_extract_key(cfg, units, inputs)}"
    build_key = content_key(extract_dir.name, cfg.model_dump(exclude={"workers", "work_dir", "output_dir", "executor"}))
    done = None if force else Manifest.current(out_dir, build_key)
    if done is not None:
        _prune_other_extracts(cfg.work_path, extract_dir)  # a run killed just after its manifest skipped this
        return done
    (out_dir / "manifest.json").unlink(missing_ok=True)
    staging = out_dir / f".staging-{build_key}"
    _remove_leftovers(out_dir, cfg.work_path, extract_dir if cfg.executor.kind == "local" else None, staging)
    if force:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(extract_dir / f"write-{build_key}", ignore_errors=True)
    timings["plan_s"] = time.perf_counter() - start
    stages = _Stages()

    with stages.stage("extract") as runs:
        # built here first: forked workers inherit it, and a bad benchmarks_dir fails before any task starts
        decontam = benchmark_index(cfg.decontam).summary() if cfg.decontam.enabled else None
        runs.append(_run(cfg, extract_pipeline(cfg, units, extract_dir), len(units), extract_dir / "logs", "extract"))
    step_stats = runs[0].steps
    dedup_dir, layout = deduplicate(cfg, units, extract_dir, stages)

    with stages.stage("mix"):
        alive = np.load(dedup_dir / "kept.npy")
        mix_dir = dedup_dir / f"mix-{build_key}"
        plans, sizes = assign_copies(cfg, [u.source for u in units], extract_dir, layout.offsets, alive, mix_dir)
        del alive

    with stages.stage("write") as runs:
        names = shard_names(sizes, cfg.output.shard_docs)
        write_runs, counts, scratch = write_splits(cfg, units, extract_dir, mix_dir, names, staging, build_key)
        runs += write_runs
        parts = [dedup_dir / "dedup_drops.jsonl.gz", mix_dir / "dropped.jsonl.gz"]
        dropped, listed = _write_dropped(staging / "dropped.jsonl.gz", extract_dir, len(units), parts)
        _install(staging, out_dir)
        _discard(scratch)  # a full copy of the kept text

    timings.update({f"{name}_s": entry["seconds"] for name, entry in stages.table.items()})
    timings["total_s"] = time.perf_counter() - start
    manifest = _manifest(cfg, build_key, extract_dir, inputs, units, layout, dropped, plans, counts, step_stats)
    manifest.details["decontamination"] = decontam
    manifest.details["stages"] = stages.table
    manifest.timings = timings
    write_report(out_dir, manifest, listed)
    manifest.write(out_dir)
    _prune_other_extracts(cfg.work_path, extract_dir)
    _prune_others(extract_dir, ("dedup-*", "write-*"), keep={dedup_dir})
    _prune_others(dedup_dir, ("mix-*",), keep={mix_dir})
    return manifest


def _install(staging: Path, out_dir: Path) -> None:
    """Replace the previous train/ and val/ with the new ones (the manifest, written last, marks completion)."""
    for split in ("train", "val"):
        target = out_dir / split
        if target.exists():
            shutil.rmtree(target)
        (staging / split).rename(target)
    (staging / "dropped.jsonl.gz").replace(out_dir / "dropped.jsonl.gz")
    shutil.rmtree(staging)


def _discard(folder: Path) -> None:
    """Remove a folder all at once as far as a rerun can tell: renamed first, then deleted."""
    if folder.exists():
        trash = folder.with_name(f".discard-{folder.name}")
        folder.rename(trash)
        shutil.rmtree(trash)


def _remove_leftovers(out_dir: Path, work: Path, extract_dir: Path | None, staging: Path) -> None:
    """Temporary files of a killed run: other builds' staging folders and the hidden temporary files of
    interrupted atomic writes (this build's staging is kept: its finished shards are reused). The task
    outputs' are left alone under Slurm (``extract_dir`` None), where a running job may be writing them."""
    for other in out_dir.glob(".staging-*"):
        if other != staging:
            shutil.rmtree(other, ignore_errors=True)
    patterns = (".*.tmp", "*/.*.tmp", "*/*/.*.tmp", "*/*/*/.*.tmp")
    tasks = [t for p in patterns for t in extract_dir.glob(p)] if extract_dir is not None else []
    for trash in extract_dir.glob(".discard-*") if extract_dir is not None else ():
        shutil.rmtree(trash, ignore_errors=True)
    for tmp in (*tasks, *out_dir.glob(".*.tmp"), *work.glob(".*.tmp")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _prune_other_extracts(work: Path, keep: Path) -> None:
    """Extract outputs of earlier configs are full copies of the documents: keep only the current one."""
    _prune_others(work, ("extract-*",), keep={keep})


def _prune_others(folder: Path, patterns: tuple[str, ...], keep: set[Path]) -> None:
    for pattern in patterns:
        for old in folder.glob(pattern):
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)


def _manifest(cfg, build_key, extract_dir, inputs, units, layout, dropped, plans, counts, step_stats) -> Manifest:
    read = Counter()
    for unit, rows in zip(units, layout.rows.tolist()):
        read[unit.source] += rows
    for key, per_source in dropped.items():
        if key.split("/")[0] in ("filter", "decontaminate", "read"):
            read.update(per_source)
    return Manifest(
        stage="corpus",
        key=build_key,
        config=cfg.model_dump(mode="json"),
        inputs=inputs,
        outputs={"train": "train", "val": "val", "dropped": "dropped.jsonl.gz", "report": "report.md"},
        counts={
            "documents_in": sum(read.values()),
            **{f"documents_{split}": sum(c["docs"] for c in counts[split].values()) for split in counts},
            "extract_tasks": len(units),
        },
        details={
            "extract_dir": str(extract_dir),
            "per_source": {"read": dict(read), "train": counts["train"], "val": counts["val"]},
            "dropped": dropped,
            "mixture": _achieved_mixture(plans, counts["train"]),
            "seeds": {"mix": cfg.mix.seed, "split": cfg.split.seed, "minhash": cfg.dedup.near.seed},
            "extract_steps": step_stats,
        },
    )


def _achieved_mixture(plans: dict, train: dict) -> dict:
    """Requested beside achieved shares, in characters and (when counted) tokens."""
    totals = {unit: sum(c.get(unit, 0) for c in train.values()) or 1 for unit in ("chars", "tokens")}
    mixture = {}
    for name, plan in plans.items():
        got = train.get(name, {})
        entry = {
            "weight": plan.weight,
            "available_chars": plan.available_chars,
            "factor": round(plan.factor, 6),
            "capped_by_max_repeat": plan.capped,
            "requested_share": plan.weight,
            "achieved_chars": got.get("chars", 0),
            "achieved_share": got.get("chars", 0) / totals["chars"],
        }
        if "tokens" in got:
            entry.update(achieved_tokens=got["tokens"], achieved_token_share=got["tokens"] / totals["tokens"])
        mixture[name] = entry
    return mixture
