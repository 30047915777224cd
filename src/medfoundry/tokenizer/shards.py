"""Packed token shards: every corpus part becomes one flat array of token ids.

``CORPUS/{split}/part-XXXXX.jsonl.gz`` -> ``OUT/{split}/part-XXXXX.bin`` (each document's ids followed
by the EOS id, raw little-endian) + ``part-XXXXX.idx.npy`` (int64 start of each document). A part's
output depends only on that part and the tokenizer, so the shards are byte-identical whatever the
worker count or executor, and a re-run skips every part whose input and tokenizer hashes match its index
entry.

Each part to build is one datatrove task (:class:`TokenizePart`) run by :func:`medfoundry.executor.run_tasks`
on the configured executor (a local process pool or a Slurm array job; a command that submitted one raises
:class:`~medfoundry.errors.Pending` and, run again once the job is done, goes on). A task writes its two
files, then its index entry to ``OUT/.work/parts/{split}-{name}.json``, each atomically; this process
then assembles ``index.json`` from those entries and the ones reused. While parts are being rebuilt
``index.json`` says ``"complete": false`` (and the old ``manifest.json`` is gone); ``true`` only at the end.

Every entry of ``index.json`` records the xxh3-128 checksums of its two files. A re-run checks them
and rebuilds a part whose files are missing, truncated or corrupted;
:class:`~medfoundry.tokenizer.token_shards.TokenShards` checks sizes when it opens a split and the checksums on
demand, naming the file at fault. A run killed at any point leaves only hidden ``.*.tmp`` files, removed by the
next run (with Slurm, once the job's tasks are done: one may be writing), and the tasks' logs in
``OUT/.work/logs-<key>`` (the key hashes the tokenizer and the parts to build): the same command run again skips
the tasks that finished, and uses their entries once their files check out. A finished build removes the logs
and entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np
import xxhash
from datatrove.pipeline.base import PipelineStep

from medfoundry.errors import InputError, MedfoundryError
from medfoundry.executor import ExecutorConfig, StageRun, run_tasks
from medfoundry.io import CHECKSUM, atomic_open, file_checksum, open_binary, write_json
from medfoundry.manifest import (
    MANIFEST,
    HashCache,
    Manifest,
    content_key,
    file_digest,
    inputs_fingerprint,
    output_fingerprint,
)
from medfoundry.model.load import load_backend_tokenizer
from medfoundry.runtime import cpu_count, peak_rss, reset_peak_rss

DTYPES = ("uint16", "uint32")
ENCODE_BATCH = 1000  # documents per encode_batch call
_PART_SUFFIX = ".jsonl.gz"
WORK = ".work"  # OUT/.work: the tasks' logs and index entries, and the corpus parts' digests


def tokenize_corpus(
    corpus_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    eos_token: str | None = None,
    dtype: str = "auto",
    workers: int = 0,
    splits=("train", "val"),
    executor: ExecutorConfig | None = None,
) -> Manifest:
    """Tokenize every corpus part into ``out_dir/{split}``; returns (and writes) ``out_dir/manifest.json``.
    ``tokenizer_dir`` may be a ``.gguf`` model file (its tokenizer, from the dequantized checkpoint).
    The parts run as tasks on ``executor`` (default: local, ``workers`` processes, 0 = one per core)."""
    from medfoundry.model.load import tokenizer_directory

    executor = executor or ExecutorConfig()
    start = time.perf_counter()
    reset_peak_rss()
    config = {
        "corpus_dir": str(corpus_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "output_dir": str(out_dir),
        "eos_token": eos_token,
        "dtype": dtype,
        "workers": workers,
        "executor": executor.model_dump(mode="json"),
    }
    corpus_dir, tokenizer_dir, out_dir = Path(corpus_dir), tokenizer_directory(tokenizer_dir), Path(out_dir)
    header, eos_token = _header(tokenizer_dir, eos_token, dtype)
    work = out_dir / WORK
    if executor.kind == "local":  # a Slurm job of this build may be writing its temporaries right now
        _remove_temporaries(out_dir, splits)
    with HashCache(work / "digests.json") as hashes:
        shards, todo = _plan(corpus_dir, out_dir, header, splits, hashes)
    run, built_tokens, tokenize_s = None, 0, 0.0
    if todo:
        (out_dir / MANIFEST).unlink(missing_ok=True)  # a readable manifest marks a finished output
        for split in splits:
            _write_index(out_dir / split, header, shards[split], complete=False)
        tokenize_start = time.perf_counter()
        run, built = _build(executor, workers, str(tokenizer_dir), header, todo, out_dir, shards)
        tokenize_s = time.perf_counter() - tokenize_start
        built_tokens = sum(entry["tokens"] for entry in built)
    for split in splits:
        _write_index(out_dir / split, header, shards[split], complete=True)
        _remove_stale(out_dir / split, shards[split])
    manifest = _manifest(config, header, eos_token, shards, built_tokens, tokenize_s, time.perf_counter() - start)
    peaks = [(peak_rss() or 0) / 2**20, run.peak_rss_mb if run else 0.0]
    manifest.details["stages"] = {
        "tokenize": {
            "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(max(peaks), 1),
            "tasks": len(todo),
        }
    }
    manifest.write(out_dir)
    _clean_work(work)
    _remove_temporaries(out_dir, splits)
    return manifest


# -- tokenizer, EOS and dtype ------------------------------------------------------------------


def _header(tokenizer_dir: Path, eos_token: str | None, dtype: str) -> tuple[dict, str]:
    """The fields every index.json starts with; they decide whether earlier shards can be reused."""
    tokenizer = load_backend_tokenizer(tokenizer_dir)
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    eos_token = eos_token or _configured_eos(tokenizer_dir)
    if eos_token is None and tokenizer.token_to_id("<|endoftext|>") is not None:
        eos_token = "<|endoftext|>"
    if eos_token is None:
        raise MedfoundryError(
            f"{tokenizer_dir}: no end-of-document token (no eos_token in tokenizer_config.json "
            "and no <|endoftext|> in the vocabulary); pass eos_token=... naming one"
        )
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise MedfoundryError(f"{tokenizer_dir}: eos token {eos_token!r} is not in the vocabulary")
    header = {
        "dtype": _choose_dtype(dtype, vocab_size),
        "eos_id": eos_id,
        "vocab_size": vocab_size,
        "tokenizer": {"path": str(tokenizer_dir.resolve()), "fingerprint": _tokenizer_fingerprint(tokenizer_dir)},
    }
    return header, eos_token


def _configured_eos(tokenizer_dir: Path) -> str | None:
    config = tokenizer_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _choose_dtype(dtype: str, vocab_size: int) -> str:
    if dtype == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in DTYPES:
        raise MedfoundryError(f"dtype must be auto, uint16 or uint32, not {dtype!r}")
    if dtype == "uint16" and vocab_size > 2**16:
        raise MedfoundryError(
            f"dtype uint16 holds ids below 65,536 but the vocabulary has {vocab_size:,} ids; use dtype uint32 or auto"
        )
    return dtype


def _tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """Fingerprint of the files load_backend_tokenizer reads (so it changes exactly when the encoding can)."""
    names = ["tokenizer.json"] if (tokenizer_dir / "tokenizer.json").is_file() else ["vocab.json", "merges.txt"]
    return inputs_fingerprint(tokenizer_dir, names=names)


# -- planning and resuming ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """A corpus part to tokenize: its split, path and content digest (when it was planned)."""

    split: str
    path: str
    digest: str

    @property
    def name(self) -> str:
        return _shard_name(Path(self.path))


def _corpus_parts(corpus_dir: Path, split: str) -> list[Path]:
    split_dir = corpus_dir / split
    if not split_dir.is_dir():
        raise InputError(str(split_dir), "missing: expected a corpus directory from `medfoundry corpus build`")
    return sorted(split_dir.glob(f"part-*{_PART_SUFFIX}"))


def _shard_name(part: Path) -> str:
    return part.name.removesuffix(_PART_SUFFIX)


def _plan(
    corpus_dir: Path, out_dir: Path, header: dict, splits, hashes: HashCache
) -> tuple[dict[str, dict[str, dict]], list[_Part]]:
    """Per split, the earlier index's entries kept (by .bin name: same input, files intact), and the parts
    to tokenize, in split then part order. The files are read by a few threads (hashing releases the GIL)."""
    itemsize = np.dtype(header["dtype"]).itemsize
    candidates = []
    for split in splits:
        previous = _reusable_entries(out_dir / split, header)
        candidates += [(split, p, previous.get(_shard_name(p) + ".bin")) for p in _corpus_parts(corpus_dir, split)]

    def check(candidate: tuple) -> tuple[_Part, dict | None]:
        split, part, entry = candidate
        digest = file_digest(part, hashes)
        return _Part(split, str(part), digest), _reusable(entry, out_dir / split, digest, itemsize)

    with ThreadPoolExecutor(max(1, min(cpu_count(), 8))) as pool:
        checked = list(pool.map(check, candidates))
    shards: dict[str, dict[str, dict]] = {split: {} for split in splits}
    todo = []
    for part, entry in checked:
        if entry is None:
            todo.append(part)
        else:
            shards[part.split][entry["bin"]] = entry
    return shards, todo


def _reusable_entries(split_dir: Path, header: dict) -> dict[str, dict]:
    """Entries of an earlier index written with the same tokenizer files, EOS and dtype, by .bin name
    (a tokenizer that merely moved to another directory does not invalidate them)."""
    try:
        index = json.loads((split_dir / "index.json").read_text())
    except (OSError, ValueError):
        return {}
    same = [index.get(key) == header[key] for key in ("dtype", "eos_id", "vocab_size")]
    if not all(same) or index.get("tokenizer", {}).get("fingerprint") != header["tokenizer"]["fingerprint"]:
        return {}
    return {entry["bin"]: entry for entry in index.get("shards", [])}


def _remove_temporaries(out_dir: Path, splits) -> None:
    """The hidden temporary files of an interrupted run (an atomic write killed midway)."""
    for directory in (out_dir, out_dir / WORK, out_dir / WORK / "parts", *(out_dir / split for split in splits)):
        for tmp in directory.glob(".*.tmp") if directory.is_dir() else ():
            tmp.unlink(missing_ok=True)


def _reusable(entry: dict | None, split_dir: Path, source_digest: str, itemsize: int) -> dict | None:
    """The entry of an earlier run when its files are intact and were made from this very input, else None:
    the part is rebuilt."""
    if entry is None or entry.get("source_digest") != source_digest:
        return None
    bin_path, idx_path = split_dir / entry["bin"], split_dir / entry["idx"]
    if not (bin_path.is_file() and idx_path.is_file()) or bin_path.stat().st_size != entry["tokens"] * itemsize:
        return None
    try:
        if np.load(idx_path, mmap_mode="r").shape != (entry["docs"],):
            return None
    except (OSError, ValueError, EOFError):
        return None
    found = {"bin": file_checksum(bin_path), "idx": file_checksum(idx_path)}
    return entry if entry.get("checksums") == found else None


# -- tasks -------------------------------------------------------------------------------------


def _build(
    executor: ExecutorConfig,
    workers: int,
    tokenizer_dir: str,
    header: dict,
    todo: list[_Part],
    out_dir: Path,
    shards: dict[str, dict[str, dict]],
) -> tuple[StageRun, list[dict]]:
    """One task per part of ``todo`` on the executor; adds their entries to ``shards``. Returns the stage's
    run and the entries this command tokenized (not those an earlier, interrupted run of it finished)."""
    work = out_dir / WORK
    key = content_key("tokenize", header, [[p.split, p.name, p.digest] for p in todo])
    logs = work / f"logs-{key}"
    for other in work.glob("logs-*"):  # the tasks of other inputs: their completion marks mean nothing here
        if other != logs:
            shutil.rmtree(other, ignore_errors=True)
    itemsize = np.dtype(header["dtype"]).itemsize
    results = [_result_path(work, part) for part in todo]
    finished = set()
    for rank, (part, path) in enumerate(zip(todo, results)):
        if _finished_entry(path, key, part, out_dir, itemsize) is None:
            path.unlink(missing_ok=True)  # run_tasks then runs the task again despite its completion mark
        elif (logs / "completions" / f"{rank:05d}").is_file():
            finished.add(rank)
    threads = executor.slurm.cpus_per_task if executor.kind == "slurm" else 1  # local: processes
    step = TokenizePart(todo, tokenizer_dir, header, str(out_dir), key, threads)
    sizes = [Path(part.path).stat().st_size for part in todo]  # compressed corpus bytes: a bar that moves evenly
    run = run_tasks(executor, [step], len(todo), workers, logs, "tokenize", "B", results, sizes)
    built = []
    for rank, (part, path) in enumerate(zip(todo, results)):
        entry = _read_result(path, key)
        shards[part.split][entry["bin"]] = entry
        if rank not in finished or executor.kind == "slurm":  # a Slurm job's tasks all worked for this build
            built.append(entry)
    return run, built


def _result_path(work: Path, part: _Part) -> Path:
    return work / "parts" / f"{part.split}-{part.name}.json"


def _finished_entry(path: Path, key: str, part: _Part, out_dir: Path, itemsize: int) -> dict | None:
    """The entry a task of this very build left in ``path`` when its files are intact, else None."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("key") != key or not isinstance(result.get("entry"), dict):
        return None
    try:
        return _reusable(result["entry"], out_dir / part.split, part.digest, itemsize)
    except (KeyError, TypeError):
        return None


def _read_result(path: Path, key: str) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(str(path), f"a finished task's index entry is unreadable ({exc}); run again") from None
    if result.get("key") != key:
        raise InputError(str(path), "written by the task of another tokenization; run again")
    return result["entry"]


def _clean_work(work: Path) -> None:
    """After a finished build: the tasks' logs and entries (index.json has the entries now; a rerun that
    has parts to rebuild starts new tasks)."""
    for logs in work.glob("logs-*"):
        shutil.rmtree(logs, ignore_errors=True)
    shutil.rmtree(work / "parts", ignore_errors=True)


class TokenizePart(PipelineStep):
    """Task ``rank`` tokenizes corpus part ``parts[rank]`` into ``OUT/{split}/{name}.bin`` and ``.idx.npy``,
    then writes its index entry (counts, checksums) to ``OUT/.work/parts/{split}-{name}.json``, each file
    atomically and the entry last: an entry stands for finished files."""

    name = "tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, parts: list[_Part], tokenizer_dir: str, header: dict, out_dir: str, key: str, threads: int):
        super().__init__()
        self.parts = parts
        self.tokenizer_dir = tokenizer_dir
        self.header = header
        self.out_dir = out_dir
        self.key = key
        self.threads = threads

    def run(self, data, rank: int = 0, world_size: int = 1):
        part, out_dir = self.parts[rank], Path(self.out_dir)
        with self.track_time(), _tokenizer_threads(self.threads):
            tokenizer = _tokenizer(self.tokenizer_dir, self.header["tokenizer"]["fingerprint"])
            if file_digest(Path(part.path)) != part.digest:
                raise InputError(part.path, "changed since this tokenization was planned; run it again")
            entry = _tokenize_part(tokenizer, Path(part.path), out_dir / part.split, self.header, part.digest)
            write_json(_result_path(out_dir / WORK, part), {"key": self.key, "entry": entry})
        self.stat_update("documents", value=entry["docs"])
        self.stat_update("tokens", value=entry["tokens"])
        return
        yield  # a generator: datatrove drains every step


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_dir: str, fingerprint: str):
    """Loaded once per worker process (and checked to be the tokenizer the build was planned with)."""
    if _tokenizer_fingerprint(Path(tokenizer_dir)) != fingerprint:
        raise InputError(tokenizer_dir, "the tokenizer changed since this tokenization was planned; run it again")
    tokenizer = load_backend_tokenizer(tokenizer_dir)
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a text must not fake a document end
    return tokenizer


@contextlib.contextmanager
def _tokenizer_threads(threads: int):
    """The tokenizer's own threads: none where the processes are the parallelism (local), else the task's CPUs."""
    saved = {name: os.environ.get(name) for name in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    if threads > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _tokenize_part(tokenizer, part: Path, split_dir: Path, header: dict, source_digest: str) -> dict:
    """Write ``{name}.bin`` and ``{name}.idx.npy`` of one corpus part; returns its index entry."""
    name = _shard_name(part)
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    offsets, sources, total = [], Counter(), 0
    bin_digest = xxhash.xxh3_128()
    with atomic_open(split_dir / f"{name}.bin", "wb") as out:
        for texts, names in _document_batches(part):
            ids = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
            batch_start = total
            for doc_ids, source in zip(ids, names):
                doc_ids.append(header["eos_id"])
                offsets.append(total)
                total += len(doc_ids)
                sources[source] += len(doc_ids)
            data = np.fromiter(chain.from_iterable(ids), dtype, total - batch_start).tobytes()
            bin_digest.update(data)
            out.write(data)
    with atomic_open(split_dir / f"{name}.idx.npy", "wb") as out:
        np.save(out, np.asarray(offsets, dtype=np.int64))
    return {
        "bin": f"{name}.bin",
        "idx": f"{name}.idx.npy",
        "tokens": total,
        "docs": len(offsets),
        "source_digest": source_digest,
        "sources": dict(sorted(sources.items())),
        "checksums": {"bin": bin_digest.hexdigest(), "idx": file_checksum(split_dir / f"{name}.idx.npy")},
    }


def _document_batches(part: Path):
    """Yield (texts, sources) lists of up to ENCODE_BATCH documents."""
    texts, sources, line_no = [], [], 0
    with open_binary(part) as fh:
        try:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    texts.append(doc["text"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise InputError(str(part), f"not a corpus document with a text field ({exc})", line_no) from None
                sources.append(doc.get("source") or "unknown")
                if len(texts) == ENCODE_BATCH:
                    yield texts, sources
                    texts, sources = [], []
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupted .gz (its CRC catches it)
            raise InputError(
                str(part), f"unreadable corpus part ({exc}); build the corpus again", line_no + 1
            ) from None
    if texts:
        yield texts, sources


# -- outputs -----------------------------------------------------------------------------------


def _write_index(split_dir: Path, header: dict, shards: dict[str, dict], complete: bool) -> None:
    entries = [shards[name] for name in sorted(shards)]
    write_json(
        split_dir / "index.json",
        {
            **header,
            "checksum": CHECKSUM,
            "shards": entries,
            "tokens": sum(e["tokens"] for e in entries),
            "docs": sum(e["docs"] for e in entries),
            "complete": complete,
        },
    )


def _remove_stale(split_dir: Path, shards: dict[str, dict]) -> None:
    """Delete shards of corpus parts that no longer exist (a rebuilt corpus may have fewer parts)."""
    keep = {name for entry in shards.values() for name in (entry["bin"], entry["idx"])}
    for path in chain(split_dir.glob("part-*.bin"), split_dir.glob("part-*.idx.npy")):
        if path.name not in keep:
            path.unlink()


def _manifest(config: dict, header: dict, eos_token, shards, built_tokens, tokenize_s, total_s) -> Manifest:
    counts, sources = {}, {}
    for split, entries in shards.items():
        counts[f"{split}_tokens"] = sum(e["tokens"] for e in entries.values())
        counts[f"{split}_documents"] = sum(e["docs"] for e in entries.values())
        counts[f"{split}_shards"] = len(entries)
        sources[split] = dict(sorted(sum((Counter(e["sources"]) for e in entries.values()), Counter()).items()))
    return Manifest(
        stage="tokens",
        config=config,
        inputs={
            config["corpus_dir"]: output_fingerprint(config["corpus_dir"]),
            config["tokenizer_dir"]: header["tokenizer"]["fingerprint"],
        },
        outputs={split: split for split in shards},
        counts={**counts, "tokens_tokenized": built_tokens},
        timings={"tokenize_s": round(tokenize_s, 3), "total_s": round(total_s, 3)},
        details={
            "tokenizer": {
                "path": header["tokenizer"]["path"],
                "vocab_size": header["vocab_size"],
                "eos_token": eos_token,
                "eos_id": header["eos_id"],
            },
            "dtype": header["dtype"],
            "source_tokens": sources,
            "tokens_per_s": round(built_tokens / tokenize_s) if tokenize_s > 0 else 0,
        },
    )
