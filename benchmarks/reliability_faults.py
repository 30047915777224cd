"""Fault scenarios (group ``faults``, needs ``../shared/data``): a small real pipeline is built once as the
reference, uninterrupted (24 files of PubMed abstracts plus general replay -> ``corpus build`` with
decontamination -> a 2,000-token BPE -> ``tokenize`` into ~20 parts -> ``pretrain`` of a tiny GPT-2 with
dropout, 40 steps, a checkpoint every 2 steps, keep 2). Then each try, in a fresh directory:

- *SIGKILL during corpus build / tokenization / training*: the command is started and its whole process
  group SIGKILLed at a random point of its work (after its start-up, a uniform share of the reference
  run's working time), then the resumed run is killed zero to two more times at random points, then run
  to completion. Survived: it finished, its outputs equal the reference (every document, once; shards
  byte-identical; final weights bit-identical, each step logged once) and no temporary file is left.
- *SIGKILL during checkpoint saving*: killed 0-20 ms after a save starts (its hidden ``.step-*.saving``
  folder appears), one to three times. Survived as above, and every ``step-*`` folder left verifies.
- *full disk during checkpoint save*: ``RLIMIT_FSIZE`` (1 MB) set on the running trainer with ``prlimit``
  after its first checkpoints, and, where a tmpfs can be mounted (root), ``checkpoints/`` on a tmpfs with
  room for 1.5 or 2.5 checkpoints (grown by a remount before the re-run). Survived: the run stops with an
  error naming the file, the cause and the intact previous checkpoint, no partial folder is left, and
  re-running without the limit ends bit-identical to the reference.
- *corrupted checkpoint*: a run killed mid-way has a byte of a random file of its newest checkpoint
  flipped, or the file truncated. Survived: the resumed run names the damaged file, falls back to the
  previous checkpoint and ends bit-identical.
- *corrupted token shard*: a byte of a random shard file flipped, or the file truncated. Survived: opening
  the split (size) or ``TokenShards.verify()`` (checksum) names that file, and re-running ``tokenize``
  rebuilds it to the reference bytes.
- *recipe: stale stages and kill windows*: a finished recipe (corpus -> tokenizer -> tokens -> pretrain ->
  eval -> generate) has its corpus changed; the changed recipe is run (half the time first ``--until`` an
  early stage) and ``medfoundry run`` SIGKILLed one to three times: at a random time, just after a stage is
  recorded starting (its old output being moved aside) or just after one is recorded done (between
  stages). Survived: no kill left a stage recorded done without its output, and the last run rebuilt every
  stage (none of the old recipe's outputs reused) to the same outputs as an uninterrupted run.
- *second run on a folder in use*: a ``medfoundry run``, ``corpus build`` or ``pretrain`` is frozen (SIGSTOP)
  at a random point of its work and the same command started again. Survived: the second fails at once
  (exit code 2) naming the first's pid; the first is SIGKILLed and a third run takes the folder over and
  ends with the reference output.
- *power cut while writing a folder*: ``benchmarks/power_loss.py`` records fsyncs, cuts the power just
  after a tokenizer, model export or GGUF conversion returned (each one's first try), or at a random fsync
  of it, then loses what was not flushed. Survived: the folder is absent or identical to an uncut writer's,
  and the GGUF cache, asked again, gives a complete conversion.

Documents lost (``data_lost``) count reference documents missing, duplicated or changed in the output
(corpus), and the documents of shards that differ from the reference or whose damage went unnoticed
(tokens).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from reliability_frame import (
    ENV,
    REPO,
    SHARED,
    Context,
    Row,
    attempt,
    kill_during,
    leftovers,
    medfoundry,
    run_scenarios,
    run_with_kills,
    start,
    tail,
)

# -- the fault group: a small reference pipeline ---------------------------------------------------

N_FILES, DOCS_PER_FILE, REPLAY_DOCS = 24, 10, 30
# per stage, the file (in its output) whose appearance ends the start-up (imports, planning): the work begins
MARKERS = {"corpus": ".work", "tokens": "train", "pretrain": "run.json"}
TRAIN_STEPS, CKPT_EVERY = 40, 2


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def _inputs(root: Path) -> Path:
    """24 files of 10 PubMed abstracts and one of general-domain replay."""
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    with gzip.open(SHARED / "corpus" / "pubmed_abstracts.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("pmid") and len(rec.get("abstract") or "") > 400:
                docs.append(rec)
            if len(docs) == N_FILES * DOCS_PER_FILE:
                break
    for i in range(N_FILES):
        _write_jsonl(root / f"abstracts_{i:02d}.jsonl.gz", docs[i * DOCS_PER_FILE : (i + 1) * DOCS_PER_FILE])
    with gzip.open(SHARED / "corpus" / "general_replay.jsonl.gz", "rt", encoding="utf-8") as fh:
        _write_jsonl(root / "replay.jsonl.gz", [json.loads(line) for _, line in zip(range(REPLAY_DOCS), fh)])
    return root


def corpus_config(inputs: Path, out: Path) -> dict:
    return {
        "output_dir": str(out),
        "workers": 2,
        "strict": False,
        "sources": [
            {
                "name": "abstracts",
                "kind": "jsonl",
                "paths": [str(inputs / "abstracts_*.jsonl.gz")],
                "fields": {"text": ["title", "abstract"], "id": "pmid", "pmid": "pmid"},
            },
            {
                "name": "replay",
                "kind": "jsonl",
                "paths": [str(inputs / "replay.jsonl.gz")],
                "fields": {"text": ["text"]},
                "weight": 0.05,
            },
        ],
        "decontam": {"benchmarks_dir": str(SHARED / "benchmarks")},
        "split": {"val_fraction": 0.08},
        "output": {"shard_docs": 12},
    }


def tokens_config(corpus: Path, tokenizer: Path, out: Path) -> dict:
    return {"corpus_dir": str(corpus), "tokenizer_dir": str(tokenizer), "output_dir": str(out), "workers": 2}


def pretrain_config(tokens: Path, tokenizer: Path, out: Path) -> dict:
    return {
        "output_dir": str(out),
        "model": {"preset": "gpt2-tiny", "context": 64},  # dropout on: a resume must restore every RNG
        "data": {"tokens_dir": str(tokens), "tokenizer_dir": str(tokenizer)},
        "training": {"steps": TRAIN_STEPS, "micro_batch_size": 4, "global_batch_size": 8, "precision": "fp32"},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 4},
        "checkpoint": {"every": CKPT_EVERY, "keep_last": 2},
        "eval": {"every": 20, "batches": 2},
        "log": {"every": 1},
    }


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def prepare_faults(ctx: Context) -> dict:
    """The uninterrupted reference run of each stage (built once per report), with its duration."""
    if "faults" in ctx.cache:
        return ctx.cache["faults"]
    from medfoundry.config import validate
    from medfoundry.tokenizer.config import TokenizerTrainConfig
    from medfoundry.tokenizer.train import train_tokenizer

    ref = ctx.work / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    inputs = _inputs(ctx.work / "inputs")
    timings, startups = {}, {}
    steps = (  # stage, command, the file whose appearance marks the end of start-up (imports, planning)
        (
            "corpus",
            medfoundry(
                "corpus", "build", str(write_config(ref / "corpus.yaml", corpus_config(inputs, ref / "corpus")))
            ),
            ref / "corpus" / MARKERS["corpus"],
        ),
        ("tokenizer", None, None),
        (
            "tokens",
            medfoundry(
                "tokenize",
                str(
                    write_config(ref / "tokens.yaml", tokens_config(ref / "corpus", ref / "tokenizer", ref / "tokens"))
                ),
            ),
            ref / "tokens" / MARKERS["tokens"],
        ),
        (
            "pretrain",
            medfoundry(
                "pretrain",
                str(
                    write_config(
                        ref / "pretrain.yaml", pretrain_config(ref / "tokens", ref / "tokenizer", ref / "pretrain")
                    )
                ),
            ),
            ref / "pretrain" / MARKERS["pretrain"],
        ),
    )
    for stage, argv, marker in steps:
        ctx.log(f"reference: {stage}")
        t = time.monotonic()
        if argv is None:
            train_tokenizer(
                validate(
                    TokenizerTrainConfig,
                    {
                        "corpus_dir": str(ref / "corpus"),
                        "output_dir": str(ref / "tokenizer"),
                        "vocab_size": 2000,
                        "fertility": {"top_domain_words": 0},
                    },
                )
            )
        else:
            proc = start(argv, ref / f"{stage}.log")
            while proc.poll() is None and not marker.exists():
                time.sleep(0.005)
            startups[stage] = time.monotonic() - t
            if proc.wait(timeout=900) != 0:
                raise RuntimeError(f"reference {stage} failed: {tail(ref / f'{stage}.log', 2000)}")
        timings[stage] = time.monotonic() - t
    ctx.log(
        "reference: "
        + ", ".join(
            f"{k} {v:.1f} s" + (f" ({startups[k]:.1f} s start-up)" if k in startups else "") for k, v in timings.items()
        )
    )
    ctx.cache["faults"] = {
        "inputs": inputs,
        "ref": ref,
        "timings": timings,
        "startups": startups,
        "markers": MARKERS,
        "corpus_docs": read_corpus(ref / "corpus"),
        "weights": final_weights(ref / "pretrain"),
    }
    return ctx.cache["faults"]


# -- comparing with the reference ----------------------------------------------------------------


def read_corpus(out: Path) -> dict[str, Counter]:
    """Per split, each document (its JSON line) with how many times it occurs."""
    docs = {}
    for split in ("train", "val"):
        lines = Counter()
        for part in sorted((out / split).glob("part-*.jsonl.gz")):
            with gzip.open(part, "rt", encoding="utf-8") as fh:
                lines.update(line for line in fh if line.strip())
        docs[split] = lines
    return docs


def docs_lost(reference: dict[str, Counter], got: dict[str, Counter]) -> int:
    """Documents missing, extra, duplicated or changed (a changed one counts once missing, once extra)."""
    return sum(sum(((reference[s] - got[s]) + (got[s] - reference[s])).values()) for s in reference)


def shard_files(split_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.iterdir())} if split_dir.is_dir() else {}


def shard_docs_lost(ref_tokens: Path, tokens: Path) -> int:
    """Documents of reference shards whose files differ (or are missing) in ``tokens``."""
    lost = 0
    for split in ("train", "val"):
        got = shard_files(tokens / split)
        for entry in json.loads((ref_tokens / split / "index.json").read_text())["shards"]:
            if any(got.get(entry[k]) != (ref_tokens / split / entry[k]).read_bytes() for k in ("bin", "idx")):
                lost += entry["docs"]
        if got.get("index.json") != (ref_tokens / split / "index.json").read_bytes():
            lost += 0 if lost else 1  # an index that differs while every shard matches still fails the try
    return lost


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    path = run / "model" / "model.safetensors"
    return load_file(path) if path.is_file() else {}


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return bool(a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r["step"] for r in records if "loss" in r]


def check_training(ctx: Context, run: Path, code: int, log: Path) -> tuple[bool, str]:
    ref = prepare_faults(ctx)
    if code != 0:
        return False, f"exit {code}: {tail(log)}"
    if not same_weights(final_weights(run), ref["weights"]):
        return False, "final weights differ from the uninterrupted run"
    steps = logged_steps(run)
    if steps != list(range(1, TRAIN_STEPS + 1)):
        return False, f"metrics log steps {steps[:5]}... are not 1..{TRAIN_STEPS} once each"
    left = leftovers(run)
    if left:
        return False, f"left behind: {left[:5]}"
    return True, ""


def kill_and_finish(ctx: Context, stage: str, argv: list[str], log: Path, output: Path) -> tuple[int, list[float]]:
    """Start ``argv`` (the stage's output ``output`` does not exist yet) and SIGKILL it at a uniformly random
    point of its work: once the start-up is over (the stage's marker file appears), after a random share
    of the reference run's working time. Then kill the resumed run zero to two more times at random
    points (it has less left to do: such a kill may come too late, and the run just finishes), and finally
    let it complete. A first run that ends before its kill (this machine ran faster than for the
    reference) is wiped and tried again, earlier, so that every try does inject a fault.
    Returns (the last run's return code, the kill times in seconds after the start of each killed run)."""
    ref = prepare_faults(ctx)
    total, startup = ref["timings"][stage], ref["startups"][stage]
    marker = output / ref["markers"][stage]
    landed, share = [], 0.9
    for _ in range(4):
        started = time.monotonic()
        if kill_during(argv, log, marker.exists, ctx.rng.uniform(0, share * (total - startup)), poll=0.002):
            landed.append(round(time.monotonic() - started, 3))
            break
        shutil.rmtree(output, ignore_errors=True)
        share /= 2
    later = [ctx.rng.uniform(0, total) for _ in range(ctx.rng.randint(0, 2))]
    code, more = run_with_kills(argv, log, later)
    return code, landed + more


# -- the fault scenarios ---------------------------------------------------------------------------


def corpus_build_sigkill(ctx: Context, tries: int) -> Row:
    ref = prepare_faults(ctx)
    row = Row("faults", "SIGKILL during corpus build")

    def one(i: int):
        root = ctx.work / f"corpus_kill_{i}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        config = write_config(root / "corpus.yaml", corpus_config(ref["inputs"], root / "corpus"))
        log = root / "stderr.log"
        code, landed = kill_and_finish(ctx, "corpus", medfoundry("corpus", "build", str(config)), log, root / "corpus")
        row.injected += len(landed)
        if code != 0:
            return False, 0, f"exit {code} after kills at {landed} s: {tail(log)}"
        lost = docs_lost(ref["corpus_docs"], read_corpus(root / "corpus"))
        left = leftovers(root / "corpus")
        ok = lost == 0 and not left
        return (
            ok,
            lost,
            f"killed at {landed} s"
            + (f"; {lost} documents lost or duplicated" if lost else "")
            + (f"; left behind {left[:5]}" if left else ""),
        )

    return attempt(ctx, row, tries, one)


def tokenize_sigkill(ctx: Context, tries: int) -> Row:
    ref = prepare_faults(ctx)
    row = Row("faults", "SIGKILL during tokenization")

    def one(i: int):
        root = ctx.work / f"tokens_kill_{i}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        config = write_config(
            root / "tokens.yaml", tokens_config(ref["ref"] / "corpus", ref["ref"] / "tokenizer", root / "tokens")
        )
        log = root / "stderr.log"
        code, landed = kill_and_finish(ctx, "tokens", medfoundry("tokenize", str(config)), log, root / "tokens")
        row.injected += len(landed)
        if code != 0:
            return False, 0, f"exit {code} after kills at {landed} s: {tail(log)}"
        lost = shard_docs_lost(ref["ref"] / "tokens", root / "tokens")
        left = leftovers(root / "tokens")
        return (
            lost == 0 and not left,
            lost,
            f"killed at {landed} s"
            + (f"; {lost} documents lost" if lost else "")
            + (f"; left behind {left[:5]}" if left else ""),
        )

    return attempt(ctx, row, tries, one)


def _training_run(ctx: Context, root: Path) -> tuple[list[str], Path]:
    ref = prepare_faults(ctx)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = write_config(
        root / "pretrain.yaml", pretrain_config(ref["ref"] / "tokens", ref["ref"] / "tokenizer", root / "run")
    )
    return medfoundry("pretrain", str(config)), root / "run"


def pretrain_sigkill(ctx: Context, tries: int) -> Row:
    row = Row("faults", "SIGKILL during training")

    def one(i: int):
        argv, run = _training_run(ctx, ctx.work / f"train_kill_{i}")
        log = run.parent / "stderr.log"
        code, landed = kill_and_finish(ctx, "pretrain", argv, log, run)
        row.injected += len(landed)
        ok, note = check_training(ctx, run, code, log)
        return ok, 0, f"killed at {landed} s" + (f"; {note}" if note else "")

    return attempt(ctx, row, tries, one)


def checkpoint_save_sigkill(ctx: Context, tries: int) -> Row:
    from medfoundry.train.checkpoint import checkpoint_problem

    row = Row("faults", "SIGKILL during checkpoint saving")

    def one(i: int):
        argv, run = _training_run(ctx, ctx.work / f"save_kill_{i}")
        log, ckpt = run.parent / "stderr.log", run / "checkpoints"
        saves_seen: set[str] = set()

        def saving() -> bool:  # a save under way that an earlier kill did not already hit
            try:
                names = {
                    p.name.split(".")[1]
                    for p in ckpt.iterdir()
                    if p.name.startswith(".step-") and p.name.endswith(".saving")
                }
            except OSError:
                return False
            fresh = names - saves_seen
            saves_seen.update(names)
            return bool(fresh)

        kills = []
        for _ in range(ctx.rng.randint(1, 3)):
            delay = ctx.rng.uniform(0, 0.02)
            if not kill_during(argv, log, saving, delay):
                break
            kills.append(round(delay * 1000, 1))
            row.injected += 1
            damaged = [p for p in (sorted(ckpt.glob("step-*")) if ckpt.is_dir() else []) if checkpoint_problem(p)]
            if damaged:
                return (
                    False,
                    0,
                    f"a save killed {kills[-1]} ms in left a damaged folder: {checkpoint_problem(damaged[0])}",
                )
        ok, note = check_training(ctx, run, _rerun(argv, log), log)
        if ok and not kills:
            return False, 0, "no save was caught under way"
        return ok, 0, f"killed {kills} ms into saves" + (f"; {note}" if note else "")

    return attempt(ctx, row, tries, one)


def _can_mount_tmpfs(mount: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    mount.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
        ).returncode
        == 0
    )


def _rerun(argv: list[str], log: Path) -> int:
    with open(log, "ab") as err:
        return subprocess.run(argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err, timeout=600).returncode


def checkpoint_full_disk(ctx: Context, tries: int) -> Row:
    """Even tries: RLIMIT_FSIZE set on the running trainer with prlimit. Odd tries (when a tmpfs can be
    mounted): ``checkpoints/`` on a tmpfs with room for one or two checkpoints, so the second or third save
    runs out of space (a save needs room for one more checkpoint than ``keep_last`` before it prunes);
    the tmpfs is then grown (remount) and the run resumed."""
    from medfoundry.train.checkpoint import checkpoint_problem

    ref = prepare_faults(ctx)
    row = Row("faults", "full disk during checkpoint save")
    notes = []
    one_checkpoint = sum(
        p.stat().st_size for p in sorted((ref["ref"] / "pretrain" / "checkpoints").glob("step-*"))[-1].iterdir()
    )

    def one(i: int):
        argv, run = _training_run(ctx, ctx.work / f"full_disk_{i}")
        log, ckpt = run.parent / "stderr.log", run / "checkpoints"
        mount, room = run.parent / "tmpfs", ctx.rng.choice([1.5, 2.5])
        use_tmpfs = i % 2 == 1 and _can_mount_tmpfs(mount, int(room * one_checkpoint) // 4096 * 4096)
        if i % 2 == 1 and not use_tmpfs:
            notes.append("no tmpfs could be mounted here: RLIMIT_FSIZE only")
        try:
            if use_tmpfs:
                (mount / "checkpoints").mkdir()
                run.mkdir(parents=True)
                ckpt.symlink_to(mount / "checkpoints")
                proc, cause = start(argv, log), "no space left on the device"
                kind = f"tmpfs with room for {room} checkpoints"
            else:
                after = ctx.rng.choice([1, 2, 3]) * CKPT_EVERY
                proc = start(argv, log, preexec=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline and not (ckpt / f"step-{after:08d}").is_dir():
                    time.sleep(0.002)
                if proc.poll() is not None:
                    return False, 0, f"the run ended (exit {proc.returncode}) before step {after}: {tail(log)}"
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))
                cause, kind = "file size limit", f"RLIMIT_FSIZE 1 MB after step {after}"
            code = proc.wait(timeout=300)
            row.injected += 1
            message = tail(log, 2000)
            if code == 0:
                return False, 0, f"{kind}: the run went through the full disk: {message}"
            missing = [
                part
                for part in ("checkpoint for step", "not saved: writing", cause, "is intact")
                if part not in message
            ]
            if missing:
                return False, 0, f"{kind}: exit {code} without a clear message (no {missing}): {message}"
            left = [p.name for p in ckpt.iterdir() if p.name.startswith(".")]
            damaged = [checkpoint_problem(p) for p in ckpt.glob("step-*") if checkpoint_problem(p)]
            if left or damaged or not list(ckpt.glob("step-*")):
                return False, 0, f"{kind}: after the failed save: left {left}, damaged {damaged}"
            if use_tmpfs:  # more room, as an operator would make
                subprocess.run(
                    ["mount", "-o", f"remount,size={4 * one_checkpoint // 4096 * 4096 + 4096}", str(mount)], check=True
                )
            ok, note = check_training(ctx, run, _rerun(argv, log), log)
            return ok, 0, kind + (f"; {note}" if note else "")
        finally:
            if use_tmpfs:
                subprocess.run(["umount", "-l", str(mount)], check=False)

    attempt(ctx, row, tries, one)
    row.detail = "; ".join(sorted(set(notes)))
    return row


def _damage(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    if rng.random() < 0.5 or size < 2:
        with open(path, "r+b") as fh:
            fh.truncate(rng.randrange(size))
        return "truncated"
    at = rng.randrange(size)
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
    return "bit flipped"


def checkpoint_corrupted(ctx: Context, tries: int) -> Row:
    from medfoundry.train.checkpoint import MANIFEST

    row = Row("faults", "corrupted or truncated checkpoint")

    def one(i: int):
        argv, run = _training_run(ctx, ctx.work / f"ckpt_damage_{i}")
        log, ckpt = run.parent / "stderr.log", run / "checkpoints"
        stop = ctx.rng.choice(range(2, TRAIN_STEPS // CKPT_EVERY)) * CKPT_EVERY  # two checkpoints exist by then
        if not kill_during(argv, log, lambda: (ckpt / f"step-{stop:08d}").is_dir()):
            return False, 0, "the run ended before it could be stopped"
        newest = sorted(ckpt.glob("step-*"))[-1]
        files = sorted(json.loads((newest / MANIFEST).read_text())["files"])  # shards, index, states, description
        victim = newest / ctx.rng.choice((*files, MANIFEST))
        how = _damage(victim, ctx.rng)
        row.injected += 1
        ok, note = check_training(ctx, run, _rerun(argv, log), log)
        if ok and f"damaged, skipped: {newest}" not in log.read_text():
            ok, note = False, f"the damaged {victim.relative_to(run)} was not reported"
        return ok, 0, f"{victim.relative_to(run)} {how}" + (f"; {note}" if note else "")

    return attempt(ctx, row, tries, one)


def token_shard_corrupted(ctx: Context, tries: int) -> Row:
    from medfoundry.errors import InputError
    from medfoundry.tokenizer.token_shards import TokenShards

    ref = prepare_faults(ctx)
    row = Row("faults", "corrupted or truncated token shard")

    def one(i: int):
        root = ctx.work / f"shard_damage_{i}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(ref["ref"] / "tokens", root / "tokens")
        split = ctx.rng.choice(["train", "val"])
        files = sorted(p for p in (root / "tokens" / split).glob("part-*") if p.stat().st_size > 0)
        victim = ctx.rng.choice(files)
        how = _damage(victim, ctx.rng)
        row.injected += 1
        entry = next(
            e
            for e in json.loads((root / "tokens" / split / "index.json").read_text())["shards"]
            if victim.name in (e["bin"], e["idx"])
        )
        try:
            TokenShards(root / "tokens" / split).verify()
            named = None
        except InputError as exc:
            named = exc.path
        if named != str(victim):
            return False, entry["docs"], f"{victim.name} {how}: not detected (error named {named})"
        config = write_config(
            root / "tokens.yaml", tokens_config(ref["ref"] / "corpus", ref["ref"] / "tokenizer", root / "tokens")
        )
        log = root / "stderr.log"
        code = _rerun(medfoundry("tokenize", str(config)), log)
        if code != 0:
            return False, entry["docs"], f"re-run exit {code}: {tail(log)}"
        lost = shard_docs_lost(ref["ref"] / "tokens", root / "tokens")
        return lost == 0, lost, f"{split}/{victim.name} {how}, named and rebuilt"

    return attempt(ctx, row, tries, one)


# -- the recipe's stage state: stale later stages and the kill window ----------------------------------------

RECIPE_STAGES = ("corpus", "tokenizer", "tokens", "pretrain", "eval", "generate")


def recipe_tree(inputs: Path, run: Path, split_seed: int) -> dict:
    """A small whole recipe on the fault group's inputs; ``split_seed`` changes the corpus, so every later stage
    (tokenizer, shards, weights, scores, samples) changes with it."""
    corpus = {k: v for k, v in corpus_config(inputs, run / "corpus").items() if k != "output_dir"}
    corpus.update(decontam={"enabled": False}, split={"val_fraction": 0.08, "seed": split_seed})
    return {
        "name": "kill_window",
        "run_dir": str(run),
        "stages": {
            "corpus": corpus,
            "tokenizer": {"vocab_size": 1000, "fertility": {"top_domain_words": 0}},
            "tokens": {"workers": 2},
            "pretrain": {
                "model": {"preset": "gpt2-tiny", "context": 64},
                "training": {"steps": 8, "micro_batch_size": 4, "global_batch_size": 8, "precision": "fp32"},
                "checkpoint": {"every": 2, "keep_last": 2},
                "eval": {"every": 4, "batches": 2},
            },
            "eval": {
                "tasks": [{"task": "heldout", "perplexity": {"path": "${run_dir}/corpus", "split": "val"}}],
                "limit": 10,
                "bootstrap_iters": 0,
            },
            "generate": {"prompts": ["The patient was treated with"], "sampling": {"max_tokens": 5}},
        },
    }


def recipe_outputs(run: Path) -> dict:
    """What each stage of the recipe made, by content (no path, no time)."""
    samples = (run / "generate" / "samples.jsonl").read_text().splitlines()
    return {
        "corpus": read_corpus(run / "corpus"),
        "tokenizer": (run / "tokenizer" / "tokenizer.json").read_bytes(),
        "tokens": {split: shard_files(run / "tokens" / split) for split in ("train", "val")},
        "pretrain": final_weights(run / "pretrain"),
        "eval": json.loads((run / "eval" / "model" / "results.json").read_text())["results"],
        "generate": [json.loads(line)["completion"] for line in samples],
    }


def differing_stages(a: dict, b: dict) -> list[str]:
    return [
        stage
        for stage in RECIPE_STAGES
        if not (same_weights(a[stage], b[stage]) if stage == "pretrain" else a[stage] == b[stage])
    ]


def prepare_recipe(ctx: Context) -> dict:
    """The recipe as first run (split seed 0), snapshotted, then changed (seed 1) and run again uninterrupted on
    top of it: the reference. Every try restores the snapshot in the same folder (stage keys cover the wired
    paths) and runs the changed recipe with kills."""
    if "recipe" in ctx.cache:
        return ctx.cache["recipe"]
    inputs = prepare_faults(ctx)["inputs"]
    root = ctx.work / "recipe_state"
    run, log = root / "run", root / "reference.log"
    root.mkdir(parents=True, exist_ok=True)
    before = write_config(root / "before.yaml", recipe_tree(inputs, run, split_seed=0))
    after = write_config(root / "after.yaml", recipe_tree(inputs, run, split_seed=1))
    ctx.log("reference: recipe before the change")
    if _rerun(medfoundry("run", str(before)), log) != 0:
        raise RuntimeError(f"the recipe failed: {tail(log, 2000)}")
    old = recipe_outputs(run)
    shutil.copytree(run, root / "snapshot")
    ctx.log("reference: recipe after the change")
    started = time.monotonic()
    if _rerun(medfoundry("run", str(after)), log) != 0:
        raise RuntimeError(f"the changed recipe failed: {tail(log, 2000)}")
    seconds = time.monotonic() - started
    reference = recipe_outputs(run)
    same = [s for s in RECIPE_STAGES if s not in differing_stages(old, reference)]
    if same:  # a stale output could not be told from a new one
        raise RuntimeError(f"the change leaves the output of {same} as it was")
    ctx.log(f"reference: the changed recipe ran in {seconds:.1f} s")
    ctx.cache["recipe"] = {
        "run": run,
        "snapshot": root / "snapshot",
        "after": after,
        "seconds": seconds,
        "ref": reference,
    }
    return ctx.cache["recipe"]


def _stage_entries(run: Path) -> dict[str, tuple]:
    try:
        state = json.loads((run / "stages.json").read_text())
    except (OSError, ValueError):
        return {}
    return {stage: (entry.get("key"), entry.get("status")) for stage, entry in state.items()}


def newly(run: Path, status: str) -> Callable[[], bool]:
    """A moment for :func:`kill_during`: a stage newly recorded with ``status`` in ``stages.json``."""
    seen = _stage_entries(run)

    def moment() -> bool:
        now = _stage_entries(run)
        hit = any(entry[1] == status and seen.get(stage) != entry for stage, entry in now.items())
        seen.update(now)
        return hit

    return moment


def done_without_output(run: Path) -> list[str]:
    return [
        s
        for s, (_, status) in _stage_entries(run).items()
        if status == "done" and not (run / s / "manifest.json").is_file()
    ]


def recipe_stale_and_kill_window(ctx: Context, tries: int) -> Row:
    """The corpus of a finished recipe changes. Half the tries first run the changed recipe ``--until`` an early
    stage; then ``medfoundry run`` is SIGKILLed one to three times: at a random time, just after a stage is
    recorded starting (its old output being moved aside), or just after a stage is recorded done (between
    stages). After each kill no stage may be recorded done without its output; the last run, uninterrupted,
    must end with every stage rebuilt (no output of the old recipe reused) and equal to the reference."""
    rec = prepare_recipe(ctx)
    row = Row("faults", "recipe: stale stages and kill windows")
    run, argv = rec["run"], medfoundry("run", str(rec["after"]))

    def one(i: int):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(rec["snapshot"], run)
        log, started, notes = run.parent / f"try_{i}.log", time.time_ns(), []
        if ctx.rng.random() < 0.5:
            until = ctx.rng.choice(RECIPE_STAGES[:3])
            if _rerun([*argv, "--until", until], log) != 0:
                return False, 0, f"--until {until} failed: {tail(log)}"
            notes.append(f"--until {until}")
        for k in range(ctx.rng.randint(1, 3)):  # the first kill is at a moment that comes: every try injects one
            how = ctx.rng.choice(["at random", "after starting", "between stages"][k == 0 :])
            if how == "at random":  # within the first half of an uninterrupted run: a resumed one has less to do
                moment, delay = (lambda: True), ctx.rng.uniform(0, rec["seconds"] / 2)
            else:
                moment, delay = newly(run, "starting" if how == "after starting" else "done"), ctx.rng.uniform(0, 0.01)
            if not kill_during(argv, log, moment, delay, poll=0.001):
                notes.append(f"{how}: the run ended first")
                break
            row.injected += 1
            notes.append(f"killed {how}" + (f" ({delay:.1f} s in)" if how == "at random" else ""))
            lost = done_without_output(run)
            if lost:
                return False, 0, f"{'; '.join(notes)}: recorded done without their output: {lost}"
        code = _rerun(argv, log)
        if code != 0:
            return False, 0, f"{'; '.join(notes)}: the last run failed (exit {code}): {tail(log)}"
        statuses = {s: status for s, (_, status) in _stage_entries(run).items()}
        stale = [s for s in RECIPE_STAGES if (run / s / "manifest.json").stat().st_mtime_ns < started]
        got = recipe_outputs(run)
        wrong = differing_stages(rec["ref"], got)
        left = [p for p in leftovers(run) if not p.startswith(".previous")]
        lost = docs_lost(rec["ref"]["corpus"], got["corpus"])
        problems = (
            ([f"not done: {statuses}"] if set(statuses.values()) != {"done"} else [])
            + ([f"outputs of the old recipe kept: {stale}"] if stale else [])
            + ([f"outputs differ from the uninterrupted run: {wrong}"] if wrong else [])
            + ([f"left behind: {left[:5]}"] if left else [])
        )
        return not problems, lost, "; ".join(notes + problems)

    return attempt(ctx, row, tries, one)


# -- two runs on one folder; a power cut while a folder is written (issue 18) -------------------------------


def _locked_command(ctx: Context, kind: str, root: Path) -> tuple[list[str], Path, Path]:
    """A ``medfoundry run`` (a recipe of the reference corpus build), ``corpus build`` or ``pretrain`` writing
    into ``root``: its argv, the folder it locks, and the file whose appearance says it holds the lock and
    is at work."""
    if kind == "pretrain":
        argv, run = _training_run(ctx, root)
        return argv, run, run / MARKERS["pretrain"]
    inputs = prepare_faults(ctx)["inputs"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if kind == "corpus build":
        config = write_config(root / "corpus.yaml", corpus_config(inputs, root / "corpus"))
        return medfoundry("corpus", "build", str(config)), root / "corpus", root / "corpus" / MARKERS["corpus"]
    corpus = {k: v for k, v in corpus_config(inputs, root / "run" / "corpus").items() if k != "output_dir"}
    recipe = {"name": "locked", "run_dir": str(root / "run"), "stages": {"corpus": corpus}}
    config = write_config(root / "recipe.yaml", recipe)
    return medfoundry("run", str(config)), root / "run", root / "run" / "corpus" / MARKERS["corpus"]


def _locked_output(ctx: Context, kind: str, folder: Path, code: int, log: Path) -> tuple[bool, int, str]:
    """Whether the run that took the folder over ended with the reference output and nothing left behind."""
    if kind == "pretrain":
        ok, note = check_training(ctx, folder, code, log)
        return ok, 0, note
    if code != 0:
        return False, 0, f"exit {code}: {tail(log)}"
    lost = docs_lost(prepare_faults(ctx)["corpus_docs"], read_corpus(folder / "corpus" if kind == "run" else folder))
    left = leftovers(folder)
    problems = ([f"{lost} documents lost or duplicated"] if lost else []) + ([f"left {left[:5]}"] if left else [])
    return not problems, lost, "; ".join(problems)


def concurrent_runs_locked(ctx: Context, tries: int) -> Row:
    """A second ``medfoundry run``, ``corpus build`` or ``pretrain`` on the folder a first one is working in
    (frozen with SIGSTOP at a random point of its work, so that it holds the folder however slowly the second
    starts). Survived: the second fails (exit code 2) naming the first's pid instead of waiting or writing;
    the first is then SIGKILLed, and a third run takes the folder over (the lock died with its holder) and
    ends with the reference output, nothing left behind."""
    from reliability_frame import kill_group

    ref = prepare_faults(ctx)
    row = Row("faults", "second run on a folder in use")
    kinds = {"run": "corpus", "corpus build": "corpus", "pretrain": "pretrain"}  # -> the reference stage

    def one(i: int):
        kind = list(kinds)[i % len(kinds)]
        argv, folder, marker = _locked_command(ctx, kind, ctx.work / f"locked_{i}")
        log = folder.parent / "stderr.log"
        first = start(argv, log)
        while first.poll() is None and not marker.exists():
            time.sleep(0.005)
        stage = kinds[kind]
        time.sleep(ctx.rng.uniform(0, 0.5 * (ref["timings"][stage] - ref["startups"][stage])))
        if first.poll() is not None:
            return False, 0, f"{kind}: the first run ended before the second started (exit {first.returncode})"
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            second = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
            seconds = time.monotonic() - started
        finally:
            kill_group(first)
        row.injected += 1
        if second.returncode != 2 or f"pid {first.pid} " not in second.stderr:
            return False, 0, f"{kind}: the second run: exit {second.returncode}: {second.stderr[-600:]}"
        ok, lost, note = _locked_output(ctx, kind, folder, _rerun(argv, log), log)
        return (
            ok,
            lost,
            f"{kind}: the second failed in {seconds:.1f} s naming pid {first.pid}" + (f"; {note}" if note else ""),
        )

    return attempt(ctx, row, tries, one)


def _folder_writers(ctx: Context, model) -> dict[str, tuple[Callable[[Path], Path], Callable[[Path], Path | None]]]:
    """Writers of whole folders: name -> (write into a root and return the folder, where that folder is in a
    root if it is there). A tokenizer (``tokenizer train``), an export of ``model`` and the GGUF cache (a
    conversion: see :func:`_converting`)."""
    from medfoundry.config import validate
    from medfoundry.model.export import export_hf
    from medfoundry.model.load import gguf_checkpoint
    from medfoundry.tokenizer.config import TokenizerTrainConfig
    from medfoundry.tokenizer.train import train_tokenizer

    ref = prepare_faults(ctx)["ref"]
    stand_in = ctx.work / "model.gguf"  # only its path, size and time count (the conversion is patched): kept
    stand_in.write_bytes(b"GGUF")  # outside the tries' folders, which lose their unsynced files

    def tokenizer(root: Path) -> Path:
        cfg = {"corpus_dir": str(ref / "corpus"), "output_dir": str(root / "tokenizer"), "vocab_size": 2000}
        train_tokenizer(validate(TokenizerTrainConfig, {**cfg, "fertility": {"top_domain_words": 0}}))
        return root / "tokenizer"

    return {
        "tokenizer": (tokenizer, lambda root: root / "tokenizer"),
        "model export": (lambda root: export_hf(model, ref / "tokenizer", root / "model"), lambda root: root / "model"),
        "GGUF cache": (
            lambda root: gguf_checkpoint(stand_in, root / "cache"),
            lambda root: next((root / "cache" / "gguf").glob("model-*"), None),
        ),
    }


def _converting(model, tokenizer: Path):
    """``convert_gguf`` patched into an export of ``model`` (what it does with the model it dequantized from a
    GGUF file): a conversion in a second instead of a minute."""
    from unittest import mock

    from medfoundry.model.export import export_hf

    def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
        return export_hf(model, tokenizer, out_dir, dtype=dtype)

    return mock.patch("medfoundry.model.convert.convert_gguf", convert_gguf)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder by relative path; a manifest's config and timings left out (its output folder and
    times differ run to run)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            data = json.dumps({**json.loads(data), "config": None, "timings": None}).encode()
        files[str(path.relative_to(folder))] = data
    return files


def _differs(folder: Path, reference: dict[str, bytes]) -> str | None:
    """What makes ``folder`` differ from the reference writer's, or None."""
    try:
        got = _files(folder)
    except ValueError as exc:  # a manifest cut short
        return f"{folder}: {exc}"
    changed = sorted(name for name in reference.keys() | got.keys() if got.get(name) != reference.get(name))
    sizes = [f"{name} ({len(got.get(name, b'')):,} bytes, not {len(reference.get(name, b'')):,})" for name in changed]
    return f"{folder}: {', '.join(sizes[:4])}" if changed else None


def power_loss_folders(ctx: Context, tries: int) -> Row:
    """A power cut (``benchmarks/power_loss.py``: fsyncs recorded, then what was not flushed lost) just after a
    folder writer returned (each writer's first try), or at a random fsync of it: a tokenizer, a model export,
    a GGUF conversion into the cache. Survived: the folder is absent or identical to the one an uncut writer
    made, never there with empty or truncated files; and the GGUF cache, asked again (a later run), gives a
    complete conversion."""
    from transformers import AutoModelForCausalLM

    from power_loss import PowerCut, PowerLoss

    row = Row("faults", "power cut while writing a folder")
    ref = prepare_faults(ctx)["ref"]
    model = AutoModelForCausalLM.from_pretrained(ref / "pretrain" / "model")
    with _converting(model, ref / "tokenizer"):
        writers = _folder_writers(ctx, model)
        references = {}
        for name, (write, _) in writers.items():  # each writer uncut, its fsyncs counted
            root = ctx.work / "power_reference" / name.replace(" ", "_")
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            with PowerLoss(root) as counted:
                folder = write(root)
            references[name] = (_files(folder), counted.calls)

        def one(i: int):
            name = list(writers)[i % len(writers)]
            (write, locate), (reference, fsyncs) = writers[name], references[name]
            root = ctx.work / f"power_{i}"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            # fsyncs + 1: the power goes just after the writer returned (a stage would be recorded done): the
            # first try of each writer, then a random fsync
            cut_at = fsyncs + 1 if i < len(writers) else ctx.rng.randint(1, fsyncs + 1)
            with PowerLoss(root, cut_at) as cut:
                try:
                    write(root)
                except PowerCut:
                    pass
            folder = locate(root)
            lost = cut.lose([folder] if folder is not None else [])
            row.injected += 1
            problem = _differs(folder, reference) if folder is not None and folder.exists() else None
            if name == "GGUF cache":  # a cut conversion is redone, never trusted
                problem = _differs(write(root), reference)
            note = f"{name}: cut at fsync {cut_at} of {fsyncs}, {len(lost)} file(s) or rename(s) lost"
            return problem is None, 0, note + (f"; {problem}" if problem else "")

        return attempt(ctx, row, tries, one)


FAULT_SCENARIOS = {  # name: (function, tries with --quick, tries without)
    "corpus_build_sigkill": (corpus_build_sigkill, 1, 10),
    "tokenize_sigkill": (tokenize_sigkill, 2, 12),
    "pretrain_sigkill": (pretrain_sigkill, 2, 12),
    "checkpoint_save_sigkill": (checkpoint_save_sigkill, 1, 10),
    "checkpoint_full_disk": (checkpoint_full_disk, 2, 4),
    "checkpoint_corrupted": (checkpoint_corrupted, 1, 8),
    "token_shard_corrupted": (token_shard_corrupted, 2, 12),
    "concurrent_runs_locked": (concurrent_runs_locked, 3, 6),
    "power_loss_folders": (power_loss_folders, 3, 12),
    "recipe_stale_and_kill_window": (recipe_stale_and_kill_window, 1, 6),
}


def fault_scenarios(ctx: Context) -> list[Row]:
    if not any(ctx.wants(name) for name in FAULT_SCENARIOS):
        return []
    if not (SHARED / "corpus" / "pubmed_abstracts.jsonl.gz").is_file():
        return [Row("faults", "all fault scenarios", detail=f"skipped: needs {SHARED} (the shared data folder)")]
    prepare_faults(ctx)
    return run_scenarios(ctx, "faults", FAULT_SCENARIOS)
