"""``medfoundry corpus build``: the extract stage on a datatrove executor, then one finalize pass.

extract (parallel, one task per work unit; cached by a hash of everything it depends on)
    read -> clean/filter -> decontaminate -> fingerprint -> per-task docs, keys, signatures, ledger
finalize (one process, over keys only; texts are streamed once when writing)
    deletions, same-paper, exact and near dedup -> train/val split -> mixture -> shards, manifest, report
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import xxhash
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor

from medfoundry import __version__
from medfoundry.corpus.config import CorpusConfig
from medfoundry.corpus.dedup import DocTable, Removal, resolve
from medfoundry.corpus.mix import copies_for, in_validation, plan_factors
from medfoundry.corpus.plan import WorkUnit, plan_units
from medfoundry.corpus.report import write_report
from medfoundry.corpus.steps import (
    INDEX_KEYS,
    CleanAndFilter,
    Decontaminate,
    Fingerprint,
    ReadSources,
    WriteTaskOutput,
    benchmark_index,
)
from medfoundry.errors import Pending
from medfoundry.io import atomic_open, iter_jsonl, naming_full_disk, write_json
from medfoundry.manifest import HashCache, Manifest, content_key, inputs_fingerprint
from medfoundry.model.load import load_backend_tokenizer
from medfoundry.runtime import cpu_count


def extract_pipeline(cfg: CorpusConfig, units: list[WorkUnit], out_dir: Path) -> list:
    """The datatrove pipeline of the extract stage; hand it to any datatrove executor."""
    steps = [ReadSources(units, cfg.sources, cfg.strict), CleanAndFilter(cfg.clean)]
    if cfg.decontam.enabled:
        steps.append(Decontaminate(cfg.decontam))
    full_text = {s.name for s in cfg.sources if s.kind == "jats"}
    steps += [Fingerprint(cfg.dedup.near, full_text), WriteTaskOutput(str(out_dir), cfg.dedup.near.num_perm)]
    return steps


def _extract_key(cfg: CorpusConfig, units: list[WorkUnit], inputs: dict[str, str]) -> str:
    """Everything the extract tasks' output depends on, and nothing else (weights, paths already
    resolved into ``units``, and dedup thresholds only matter later). ``inputs`` holds the fingerprints
    of the source files and of the benchmarks decontamination reads."""
    sources = [s.model_dump(exclude={"weight", "paths"}) for s in cfg.sources]
    near = cfg.dedup.near.model_dump(include={"enabled", "shingle_words", "num_perm", "seed"})
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


def make_executor(cfg: CorpusConfig, pipeline: list, tasks: int, logging_dir: Path):
    """A datatrove executor for the extract stage: a local process pool, or a Slurm array job."""
    if cfg.executor.kind == "slurm":
        slurm = cfg.executor.slurm
        env_command = slurm.env_command or (
            f"source {sys.prefix}/bin/activate" if sys.prefix != sys.base_prefix else None
        )
        return SlurmPipelineExecutor(
            pipeline,
            tasks=tasks,
            time=slurm.time,
            partition=slurm.partition,
            cpus_per_task=slurm.cpus_per_task,
            mem_per_cpu_gb=slurm.mem_per_cpu_gb,
            job_name=slurm.job_name,
            sbatch_args=slurm.sbatch_args,
            env_command=env_command,
            logging_dir=str(logging_dir),
            max_array_launch_parallel=slurm.max_array_launch_parallel,
        )
    workers = min(cfg.workers or cpu_count(), tasks)
    return _QuietLocalExecutor(
        pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir), start_method="fork"
    )


class _QuietLocalExecutor(LocalPipelineExecutor):
    """Task logs go to the logging folder only: the console gets a progress bar and, on failure, the
    one-line error the CLI prints (datatrove would print each task's log and traceback there)."""

    _devnull = None  # opened once per worker process: loguru keeps writing to the stream it was given

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        if _QuietLocalExecutor._devnull is None:
            _QuietLocalExecutor._devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        with contextlib.redirect_stderr(_QuietLocalExecutor._devnull):
            return super()._run_for_rank(rank, local_rank, node_rank)


@contextlib.contextmanager
def _progress(logs: Path, total: int):
    """A progress bar fed by the executor's completion markers (works for any executor)."""
    from datatrove.utils.logging import logger
    from tqdm import tqdm

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    done = threading.Event()
    completions = logs / "completions"

    def poll(bar) -> None:
        while not done.wait(0.25):
            bar.update(len(list(completions.glob("*"))) - bar.n if completions.is_dir() else 0)

    with tqdm(total=total, desc="extract", unit="task", disable=None) as bar:
        thread = threading.Thread(target=poll, args=(bar,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            bar.update(len(list(completions.glob("*"))) - bar.n if completions.is_dir() else 0)


def run_extract(cfg: CorpusConfig, units: list[WorkUnit], out_dir: Path) -> list[dict]:
    """Run (or submit) the extract tasks not yet completed; the per-step statistics once all are done."""
    logs = out_dir / "logs"
    executor = make_executor(cfg, extract_pipeline(cfg, units, out_dir), len(units), logs)
    active = _active_slurm_job(logs) if cfg.executor.kind == "slurm" else None
    if active and executor.get_incomplete_ranks():
        raise Pending(
            f"slurm job {active} is still running the extract tasks (logs in {logs}); "
            "run this command again when it is done"
        )
    with _progress(logs, len(units)):
        executor.run()
    if getattr(executor, "job_id", None) not in (None, -1):
        write_json(logs / "slurm_job.json", {"job_id": executor.job_id})
    incomplete = executor.get_incomplete_ranks()
    if incomplete:
        raise Pending(
            f"{len(incomplete)} of {len(units)} extract tasks are not finished "
            f"(slurm job {getattr(executor, 'job_id', '?')}; logs in {logs}). "
            "Run the same command again once they are done: finished tasks are kept, failed ones re-run."
        )
    return _step_stats(logs, len(units))


def _active_slurm_job(logs: Path) -> str | None:
    """The job submitted by an earlier run if squeue still lists it (so it is not submitted twice)."""
    record = logs / "slurm_job.json"
    if not record.is_file():
        return None
    job = str(json.loads(record.read_text())["job_id"])
    try:
        listed = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return job if listed.strip() else None


def _step_stats(logs: Path, tasks: int) -> list[dict]:
    """Per-step CPU time and counters summed over the tasks' own stats files (written by any executor)."""
    steps: dict[str, dict] = {}
    for rank in range(tasks):
        path = logs / "stats" / f"{rank:05d}.json"
        for step in json.loads(path.read_text()) if path.is_file() else []:
            entry = steps.setdefault(step["name"], {"name": step["name"], "time_s": 0.0, "stats": Counter()})
            entry["time_s"] += _total(step["time_stats"])
            entry["stats"].update({k: _total(v) for k, v in step["stats"].items()})
    return [dict(s, stats=dict(s["stats"])) for s in steps.values()]


def load_extract(out_dir: Path, tasks: int, num_perm: int) -> tuple[DocTable, list, list[dict]]:
    cols: dict[str, list] = {key: [] for key in INDEX_KEYS + ("chars",)}
    signatures, abstract_signatures, abstract_rows, ledger = [], [], [], []
    for rank in range(tasks):
        index = json.loads((out_dir / f"{rank:05d}.index.json").read_text())
        abstract_rows += [len(cols["id"]) + r for r in index["abstract_rows"]]
        for key in cols:
            cols[key].extend(index[key])
        signatures.append(np.load(out_dir / f"{rank:05d}.minhash.npy"))
        abstract_signatures.append(np.load(out_dir / f"{rank:05d}.abstract_minhash.npy"))
        ledger.extend(iter_jsonl(out_dir / f"{rank:05d}.ledger.jsonl.gz"))
    empty = np.zeros((0, num_perm), np.uint32)
    table = DocTable(
        cols["id"],
        cols["source"],
        cols["paper_keys"],
        cols["pmid"],
        cols["exact"],
        [tuple(o) for o in cols["order"]],
        np.array(cols["chars"], dtype=np.int64),
        np.concatenate(signatures) if signatures else empty,
        np.array(abstract_rows, dtype=np.int64),
        np.concatenate(abstract_signatures) if abstract_signatures else empty,
    )
    deletes = [(e["pmid"], tuple(e["order"])) for e in ledger if e.get("event") == "delete"]
    drops = [e for e in ledger if "event" not in e]
    return table, deletes, drops


def _shard_of(doc_id: str, copy: int, seed: int, shards: int) -> int:
    return xxhash.xxh64_intdigest(f"{doc_id}#{copy}".encode(), seed=seed) % shards


class _Tally:
    """Documents, characters and (with a tokenizer) tokens per split and source, as written."""

    _BATCH = 256

    def __init__(self, tokenizer=None):
        self.counts: dict[str, dict[str, dict[str, int]]] = {"train": {}, "val": {}}
        self.tokenizer = tokenizer
        self._pending: list[tuple[str, str, str, int]] = []

    def add(self, split: str, source: str, text: str, copies: int) -> None:
        entry = self.counts[split].setdefault(
            source, {"docs": 0, "chars": 0, **({"tokens": 0} if self.tokenizer else {})}
        )
        entry["docs"] += copies
        entry["chars"] += copies * len(text)
        if self.tokenizer:
            self._pending.append((split, source, text, copies))
            if len(self._pending) >= self._BATCH:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        encodings = self.tokenizer.encode_batch([text for _, _, text, _ in self._pending], add_special_tokens=False)
        for (split, source, _, copies), enc in zip(self._pending, encodings):
            self.counts[split][source]["tokens"] += copies * len(enc.ids)
        self._pending.clear()


def write_splits(
    cfg: CorpusConfig, out_dir: Path, staging: Path, tasks: int, alive: np.ndarray, val: np.ndarray, copies: np.ndarray
) -> dict:
    """Stream the kept documents once into train/val shards, then shuffle each shard.

    Each document copy goes to a shard chosen by a seeded hash of its id, then every shard is
    reordered by a seeded hash of its lines: shards mix all sources in a deterministic order, and
    memory holds one shard at a time."""
    sizes = {"train": int(copies[alive & ~val].sum()), "val": int(copies[alive & val].sum())}
    tally = _Tally(load_backend_tokenizer(cfg.report_tokenizer) if cfg.report_tokenizer else None)
    unsorted = staging / "unsorted"
    unsorted.mkdir(parents=True)
    names = {
        split: [f"{split}/part-{i:05d}.jsonl.gz" for i in range(max(1, math.ceil(n / cfg.output.shard_docs)))]
        for split, n in sizes.items()
    }
    with contextlib.ExitStack() as stack:
        shards = {
            split: [
                stack.enter_context(open(unsorted / name.replace("/", "-"), "w", encoding="utf-8")) for name in files
            ]
            for split, files in names.items()
        }
        row = 0
        for rank in range(tasks):
            with gzip.open(out_dir / f"{rank:05d}.docs.jsonl.gz", "rb") as lines:
                for line in lines:
                    if alive[row] and copies[row]:
                        split = "val" if val[row] else "train"
                        doc = json.loads(line)
                        tally.add(split, doc["source"], doc["text"], int(copies[row]))
                        _emit(doc, int(copies[row]), shards[split], cfg.mix.seed)
                    row += 1
        tally.flush()
    for files in names.values():
        for name in files:
            _shuffle_into(unsorted / name.replace("/", "-"), staging / name, cfg.mix.seed, cfg.output.compresslevel)
    shutil.rmtree(unsorted)
    return tally.counts


def _shuffle_into(source: Path, target: Path, seed: int, compresslevel: int) -> None:
    with open(source, "rb") as fh:
        lines = fh.readlines()
    lines.sort(key=lambda line: xxhash.xxh64_intdigest(line, seed=seed))
    with atomic_open(target, "wb", compresslevel=compresslevel) as out:
        out.writelines(lines)


def _emit(doc: dict, n_copies: int, files: list, seed: int) -> None:
    """Write ``n_copies`` of ``doc`` (ids ``X``, ``X#1``, ...) to seeded-hash-chosen shards."""
    base_id = doc["id"]
    for copy in range(n_copies):
        doc["id"] = f"{base_id}#{copy}" if copy else base_id
        files[_shard_of(doc["id"], copy, seed, len(files))].write(json.dumps(doc, ensure_ascii=False) + "\n")


def _install(staging: Path, out_dir: Path) -> None:
    """Replace the previous train/ and val/ with the new ones (the manifest, written last, marks completion)."""
    for split in ("train", "val"):
        target = out_dir / split
        if target.exists():
            shutil.rmtree(target)
        (staging / split).rename(target)
    (staging / "dropped.jsonl.gz").replace(out_dir / "dropped.jsonl.gz")
    shutil.rmtree(staging)


def build_corpus(cfg: CorpusConfig, force: bool = False) -> Manifest:
    """Build the corpus into ``cfg.output_dir``; returns its manifest. Nothing is redone when the output's
    manifest records the same key (inputs, extract settings and the rest of the config but the executor,
    workers and folders), unless ``force``."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    units = plan_units(cfg)
    inputs = _inputs(cfg, units)
    extract_dir = cfg.work_path / f"extract-{_extract_key(cfg, units, inputs)}"
    build_key = content_key(extract_dir.name, cfg.model_dump(exclude={"workers", "work_dir", "output_dir", "executor"}))
    done = None if force else Manifest.current(out_dir, build_key)
    if done is not None:
        _prune_other_extracts(cfg.work_path, extract_dir)  # a run killed just after its manifest skipped this
        return done
    (out_dir / "manifest.json").unlink(missing_ok=True)
    _remove_leftovers(out_dir, cfg.work_path, extract_dir)
    timings["plan_s"] = time.perf_counter() - start

    t = time.perf_counter()
    # built here first: forked workers inherit it, and a bad benchmarks_dir fails before any task starts
    decontam = benchmark_index(cfg.decontam).summary() if cfg.decontam.enabled else None
    with naming_full_disk(extract_dir):
        step_stats = run_extract(cfg, units, extract_dir)
    timings["extract_s"] = time.perf_counter() - t

    t = time.perf_counter()
    table, deletes, drops = load_extract(extract_dir, len(units), cfg.dedup.near.num_perm)
    table.rank_sources(cfg.source_rank())
    pubmed_sources = {s.name for s in cfg.sources if s.kind == "pubmed_xml"}
    removed = resolve(table, deletes, pubmed_sources, cfg.dedup)
    timings["dedup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    alive = np.ones(len(table), dtype=bool)
    alive[list(removed)] = False
    val = np.array([in_validation(i, cfg) for i in table.ids], dtype=bool)
    copies, plans = _mixture(cfg, table, alive, val)
    timings["mix_s"] = time.perf_counter() - t

    t = time.perf_counter()
    staging = out_dir / f".staging-{build_key}"
    shutil.rmtree(staging, ignore_errors=True)
    with naming_full_disk(staging):  # the split files are written through many open handles at once
        counts = write_splits(cfg, extract_dir, staging, len(units), alive, val, copies)
    unselected = np.flatnonzero(alive & (copies == 0))
    all_drops = (
        drops
        + [_removal_entry(table, row, "dedup", r) for row, r in sorted(removed.items())]
        + [
            _removal_entry(table, int(row), "mix", Removal("downsampled", "not selected by the mixture sampler"))
            for row in unselected
        ]
    )
    with atomic_open(staging / "dropped.jsonl.gz") as fh:
        for entry in all_drops:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    _install(staging, out_dir)
    timings["write_s"] = time.perf_counter() - t

    timings["total_s"] = time.perf_counter() - start
    manifest = _manifest(cfg, build_key, extract_dir, inputs, units, table, all_drops, plans, counts, step_stats)
    manifest.details["decontamination"] = decontam
    manifest.timings = timings
    write_report(out_dir, manifest, all_drops)
    manifest.write(out_dir)
    _prune_other_extracts(cfg.work_path, extract_dir)
    return manifest


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


def _mixture(cfg: CorpusConfig, table: DocTable, alive: np.ndarray, val: np.ndarray):
    """Copies per row. Factors come from the train split; validation takes each source's factor
    capped at 1 (a held-out document is never repeated), so it has the train split's composition."""
    sources = np.array(table.sources, dtype=object)
    train = alive & ~val
    available = {s.name: int(table.chars[train & (sources == s.name)].sum()) for s in cfg.sources}
    plans = plan_factors(cfg, available)
    copies = np.zeros(len(table), dtype=np.int64)
    for name, plan in plans.items():
        for split, factor in ((train, plan.factor), (alive & val, min(plan.factor, 1.0))):
            rows = np.flatnonzero(split & (sources == name))
            copies[rows] = copies_for(rows, table.ids, table.chars, factor, cfg.mix.seed)
    return copies, plans


def _total(stat) -> float:
    """datatrove saves a metric as a bare number when trivial, else as a dict with its total."""
    return stat.get("total", 0) if isinstance(stat, dict) else stat


def _removal_entry(table: DocTable, row: int, stage: str, removal: Removal) -> dict:
    return {
        "id": table.ids[row],
        "source": table.sources[row],
        "pmid": table.pmids[row],
        "stage": stage,
        "reason": removal.reason,
        "detail": removal.detail,
    }


def _manifest(cfg, build_key, extract_dir, inputs, units, table, drops, plans, counts, step_stats) -> Manifest:
    by_reason: dict[str, dict[str, int]] = {}
    for entry in drops:
        key = f"{entry['stage']}/{entry['reason']}"
        by_reason.setdefault(key, {}).setdefault(entry["source"], 0)
        by_reason[key][entry["source"]] += 1
    read = Counter(table.sources) + Counter(
        e["source"] for e in drops if e["stage"] in ("filter", "decontaminate", "read")
    )
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
            "dropped": by_reason,
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
