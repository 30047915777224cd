"""Faults, the fast versions run in CI: damaged checkpoints and token shards are named and the last good
checkpoint is used; a full disk (RLIMIT_FSIZE, and a small tmpfs where one can be mounted) during a
checkpoint save stops with a clear error and leaves the previous checkpoint intact; one SIGKILL during
tokenization and one late in a corpus build resume to identical outputs. The many-random-kill versions
(corpus build, tokenization, training, checkpoint saving) are in test_faults_long.py (`make test-long`)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ci_skips import skip_machine
from conftest import REPO
from medfoundry.errors import InputError
from medfoundry.train.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointWriteError,
    DamagedCheckpoint,
    checkpoint_problem,
    latest_checkpoint,
    read_checkpoint,
    verify_checkpoint,
)
from medfoundry.train.schedules import ScheduleConfig, build_scheduler
from medfoundry.train.state import TrainState

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "MEDFOUNDRY_NO_TCMALLOC": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# -- checkpoints -------------------------------------------------------------------------------

SHARD = "__0_0.distcp"  # DCP's file of process 0: its shards of the weights and the optimizer state
FILES = (".metadata", SHARD, "rng-00000.pt", "trainer_state.json")


def _trained(seed: int = 0):
    """A 64x64 linear layer after one AdamW step (so the optimizer has state), with its schedule."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, 10, ScheduleConfig())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _checkpointer(directory: Path, parts, keep_last: int = 0) -> Checkpointer:
    model, optimizer, scheduler = parts
    return Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler, keep_last=keep_last)


def _save(directory: Path, step: int, parts, keep_last: int = 0) -> Path:
    return _checkpointer(directory, parts, keep_last).save(TrainState(step=step, reader_state={"position": step}))


def _flip_byte(path: Path, at: float = 0.5) -> None:
    """Corrupt one byte in place (same size): only a checksum can tell."""
    with open(path, "r+b") as fh:
        fh.seek(int(path.stat().st_size * at))
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def test_damaged_checkpoints_are_named_and_the_previous_intact_one_is_used(tmp_path, capsys):
    parts = _trained()
    paths = [_save(tmp_path, step, parts) for step in (1, 2, 3)]
    manifest = json.loads((paths[2] / MANIFEST).read_text())
    assert manifest["checksum"] == "xxh3_128" and manifest["world_size"] == 1
    assert sorted(manifest["files"]) == sorted(FILES)
    assert all(entry["bytes"] == (paths[2] / name).stat().st_size for name, entry in manifest["files"].items())
    assert latest_checkpoint(tmp_path) == paths[2] and checkpoint_problem(paths[2]) is None

    _flip_byte(paths[2] / SHARD)  # bit rot: same size
    assert f"{paths[2] / SHARD}: corrupted: its xxh3_128 checksum is" in checkpoint_problem(paths[2])
    assert latest_checkpoint(tmp_path) == paths[1]
    err = capsys.readouterr().err
    assert f"checkpoint: damaged, skipped: {paths[2] / SHARD}: corrupted" in err
    assert f"checkpoint: using {paths[1]}, the newest intact checkpoint" in err
    other = _trained(1)
    with pytest.raises(DamagedCheckpoint, match=r"step-00000003/__0_0\.distcp: corrupted"):
        _checkpointer(tmp_path, other).load(paths[2])

    _truncate(paths[1] / ".metadata")  # a torn write
    assert latest_checkpoint(tmp_path) == paths[0]
    assert f"{paths[1] / '.metadata'}: truncated or damaged" in capsys.readouterr().err
    state = _checkpointer(tmp_path, other).restore()
    assert state.step == 1 and torch.equal(other[0].weight, parts[0].weight)

    # resumed from step 1: saving step 2 replaces the damaged one and retention ignores the later step 3
    _save(tmp_path, 2, parts, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    verify_checkpoint(paths[1])
    assert latest_checkpoint(tmp_path) == paths[1]

    (paths[1] / "rng-00000.pt").unlink()
    with pytest.raises(
        DamagedCheckpoint,
        match=r"no intact checkpoint: .*step-00000003/__0_0\.distcp: corrupted.*; "
        r".*step-00000002: incomplete checkpoint, missing rng-00000\.pt",
    ):
        latest_checkpoint(tmp_path)


def test_checkpoint_manifest_damage_and_checkpoints_without_one(tmp_path):
    parts = _trained()
    path = _save(tmp_path, 1, parts)
    manifest = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text('{"files": ')
    assert (
        checkpoint_problem(path)
        == f"{path / MANIFEST}: unreadable checkpoint manifest (Expecting value: line 1 column 11 (char 10))"
    )

    (path / MANIFEST).unlink()  # no manifest: its files cannot be verified, so it is refused
    refusal = f"{path}: incomplete checkpoint: no {MANIFEST}, so its files cannot be verified (move the folder away)"
    assert checkpoint_problem(path) == refusal
    for verify in (True, False):
        with pytest.raises(DamagedCheckpoint, match=re.escape(refusal)):
            read_checkpoint(path, verify=verify)
    with pytest.raises(DamagedCheckpoint, match="no intact checkpoint: .*no manifest.json"):
        _checkpointer(tmp_path, parts).restore()

    (path / MANIFEST).write_text(manifest)
    _truncate(path / ".metadata")  # unverified, still refused by the reader, naming the file
    with pytest.raises(DamagedCheckpoint, match=r"step-00000001/\.metadata: unreadable checkpoint index"):
        read_checkpoint(path, verify=False)
    (path / ".metadata").write_bytes(pickle.dumps(os.system))  # a planted pickle is refused, never run
    with pytest.raises(DamagedCheckpoint, match=r"unreadable checkpoint index .*posix\.system has no place"):
        _checkpointer(tmp_path, parts).load(path, verify=False)


def test_a_replacement_killed_between_its_two_renames_is_undone(tmp_path):
    """atomic_dir moves an existing step folder aside, then renames the new one in: a kill in between
    leaves only ``.step-N.old``, which the next start puts back."""
    path = _save(tmp_path, 4, _trained())
    path.rename(tmp_path / ".step-00000004.old")
    (tmp_path / ".step-00000004.x1y2.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


FULL_DISK = r"""
import json, resource, signal, sys
import torch
from torch import nn
from medfoundry.train.checkpoint import Checkpointer, CheckpointWriteError
from medfoundry.train.schedules import ScheduleConfig, build_scheduler
from medfoundry.train.state import TrainState

out = sys.argv[1]
torch.manual_seed(0)
model = nn.Linear(64, 64)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = build_scheduler(optimizer, 10, ScheduleConfig())
model(torch.randn(2, 64)).sum().backward()
optimizer.step()

checkpointer = Checkpointer(out, model=model, optimizer=optimizer, scheduler=scheduler, keep_last=1)

def save(step):
    return checkpointer.save(TrainState(step=step))

first = save(1)
rng, shard = (first / "rng-00000.pt").stat().st_size, (first / "__0_0.distcp").stat().st_size
limits = [rng // 2, rng + shard // 2]  # below the RNG file (written first), then inside the shard
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG instead of killing us
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
errors = []
for limit in limits:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        save(2)
        errors.append(None)
    except CheckpointWriteError as exc:
        errors.append(str(exc))
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print(json.dumps(errors))
"""


def test_file_size_limit_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE below the RNG file, then inside DCP's shard of weights and optimizer state (written
    by torch's C++ writer and by DCP's): each save fails naming the file, the cause and the previous
    checkpoint, which is intact, and leaves nothing behind."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    out = tmp_path / "checkpoints"
    run = subprocess.run([sys.executable, str(script), str(out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    previous = out / "step-00000001"
    assert sizes_ok(previous)
    errors = json.loads(run.stdout.splitlines()[-1])
    for error, name in zip(errors, ("rng-00000.pt", SHARD)):
        assert error is not None, f"a save with {name} over the file size limit succeeded"
        assert error.startswith(f"{out / 'step-00000002'}: checkpoint for step 2 not saved: writing {name} failed: ")
        assert "file size limit" in error and f"the previous checkpoint {previous} is intact" in error
    assert sorted(p.name for p in out.iterdir()) == ["step-00000001"]  # no half-written folder left
    verify_checkpoint(previous)


def sizes_ok(path: Path) -> bool:
    """Every file of a checkpoint is there and none is empty."""
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in (*FILES, MANIFEST))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs, when this process may mount one (root, outside most containers); else skip."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        skip_machine("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        skip_machine(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_tmpfs_during_a_save_keeps_the_previous_checkpoint(small_tmpfs):
    out = small_tmpfs / "checkpoints"
    parts = _trained()
    previous = _save(out, 1, parts, keep_last=1)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 48 * 1024))  # room for the weights, not the rest
    with pytest.raises(CheckpointWriteError) as err:
        _save(out, 2, parts, keep_last=1)
    message = str(err.value)
    assert f"{out / 'step-00000002'}: checkpoint for step 2 not saved: writing " in message
    assert "no space left on the device" in message and f"the previous checkpoint {previous} is intact" in message
    assert sorted(p.name for p in out.iterdir()) == ["step-00000001"]
    verify_checkpoint(previous)
    filler.unlink()  # room again: the same save goes through
    assert _save(out, 2, parts, keep_last=1) == out / "step-00000002"
    assert sorted(p.name for p in out.iterdir()) == ["step-00000002"]


# -- token shards ------------------------------------------------------------------------------


def _word_corpus(root: Path, parts: dict[str, int], docs_per_part: int = 40) -> Path:
    """A corpus directory of documents made of the words w0..w99 (a word-level tokenizer reads them)."""
    n = 0
    for split, count in parts.items():
        (root / split).mkdir(parents=True)
        for p in range(count):
            with gzip.open(root / split / f"part-{p:05d}.jsonl.gz", "wt") as fh:
                for _ in range(docs_per_part):
                    words = " ".join(f"w{(n * 7 + k * 13) % 100}" for k in range(5 + n % 23))
                    fh.write(json.dumps({"id": f"d{n}", "text": words, "source": "s", "meta": {}}) + "\n")
                    n += 1
    (root / "manifest.json").write_text("{}")
    return root


def _word_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _shard_files(split_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.iterdir())}


def test_corrupted_token_shards_are_named_and_rebuilt(tmp_path):
    from medfoundry.tokenizer.shards import tokenize_corpus
    from medfoundry.tokenizer.token_shards import TokenShards

    corpus, tokenizer, out = (
        _word_corpus(tmp_path / "corpus", {"train": 3, "val": 1}),
        _word_tokenizer(tmp_path / "tok"),
        tmp_path / "tokens",
    )
    tokenize_corpus(corpus, tokenizer, out, workers=1)
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["checksum"] == "xxh3_128" and all(set(e["checksums"]) == {"bin", "idx"} for e in index["shards"])
    original = _shard_files(out / "train")
    assert TokenShards(out / "train").verify() == 6

    _flip_byte(out / "train" / "part-00001.bin")
    shards = TokenShards(out / "train")  # sizes agree: opening is cheap and does not notice
    with pytest.raises(
        InputError,
        match=r"train/part-00001\.bin: corrupted: its xxh3_128 checksum is \w+, index\.json "
        r"records \w+; run the tokenization again to rebuild it",
    ):
        shards.verify()
    with pytest.raises(InputError, match=r"part-00001\.bin: corrupted"):
        TokenShards(out / "train", verify=True)
    _flip_byte(out / "train" / "part-00002.idx.npy", at=0.9)
    manifest = tokenize_corpus(corpus, tokenizer, out, workers=1)  # a re-run rebuilds exactly the damaged parts
    assert manifest.counts["tokens_tokenized"] == index["shards"][1]["tokens"] + index["shards"][2]["tokens"]
    assert _shard_files(out / "train") == original

    (out / "train" / "index.json").write_text('{"dtype": "uint16", "shar')
    with pytest.raises(InputError, match=r"train/index\.json: unreadable \(.*\); run the tokenization again"):
        TokenShards(out / "train")
    part = corpus / "val" / "part-00000.jsonl.gz"
    part.write_bytes(part.read_bytes()[:-20])  # a torn corpus part: gzip's CRC and length catch it
    with pytest.raises(InputError, match=r"val/part-00000\.jsonl\.gz:\d+: unreadable corpus part"):
        tokenize_corpus(corpus, tokenizer, out, workers=1)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL the process group of ``proc`` as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_tokenization_killed_midway_resumes_to_identical_shards(tmp_path):
    from conftest import shared
    from medfoundry.tokenizer.shards import tokenize_corpus
    from test_token_shards import read_abstracts, write_corpus

    gpt2 = shared("tokenizers/gpt2")
    corpus = tmp_path / "corpus"
    write_corpus(corpus, read_abstracts(1300), {"train": 12, "val": 1})
    reference = tokenize_corpus(corpus, gpt2, tmp_path / "reference", workers=1)
    out = tmp_path / "tokens"
    config = tmp_path / "tokens.yaml"
    config.write_text(
        yaml.safe_dump({"corpus_dir": str(corpus), "tokenizer_dir": str(gpt2), "output_dir": str(out), "workers": 1})
    )
    argv = [sys.executable, "-m", "medfoundry", "tokenize", str(config)]

    def three_parts_done() -> bool:  # each task leaves its index entry once its files are in place
        return len(list(out.glob(".work/parts/*.json"))) >= 3

    _kill_when(
        subprocess.Popen(
            argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        ),
        three_parts_done,
    )
    assert not json.loads((out / "train" / "index.json").read_text())["complete"]
    assert not (out / "manifest.json").exists()
    assert list(out.glob(".work/logs-*/completions/*"))  # the executor's marks of the finished tasks
    subprocess.run(argv, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    manifest = json.loads((out / "manifest.json").read_text())
    total = reference.counts["train_tokens"] + reference.counts["val_tokens"]
    assert 0 < manifest["counts"]["tokens_tokenized"] < total  # finished parts were kept, not redone
    for split in ("train", "val"):
        assert _shard_files(out / split) == _shard_files(tmp_path / "reference" / split)  # no .tmp leftovers either
    assert [p.name for p in (out / ".work").iterdir()] == ["digests.json"]  # the tasks' logs and entries are gone
    per_split = [name for name in reference.counts if name.startswith(("train_", "val_"))]  # tokens, documents, shards
    assert {n: manifest["counts"][n] for n in per_split} == {n: reference.counts[n] for n in per_split}


# -- corpus build ------------------------------------------------------------------------------


def _corpus_config(tmp_path: Path, out: Path, **extra) -> tuple[dict, Path]:
    """120 real-looking abstracts in 6 input files, and a corpus build config for them written to a file."""
    from test_corpus_build import _abstracts, _write_jsonl

    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    docs = _abstracts(120)
    for i in range(6):
        _write_jsonl(inputs / f"part_{i}.jsonl.gz", docs[i * 20 : (i + 1) * 20])
    cfg = {
        "output_dir": str(out),
        "workers": 1,
        "strict": False,
        "decontam": {"enabled": False},
        "sources": [
            {
                "name": "abstracts",
                "kind": "jsonl",
                "paths": [str(inputs / "*.jsonl.gz")],
                "fields": {"text": ["title", "abstract"], "id": "pmid", "pmid": "pmid"},
            }
        ],
        "split": {"val_fraction": 0.1},
        "output": {"shard_docs": 30},
        **extra,
    }
    config = tmp_path / "corpus.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return cfg, config


def test_a_full_disk_outside_checkpoints_is_a_clear_error_and_the_stage_resumes(tmp_path):
    """A corpus build under a 16 KiB file size limit stops with one line naming the file and the cause
    (no traceback); run again without the limit, it ends with the documents of an uninterrupted build."""
    import resource

    from medfoundry.config import validate
    from medfoundry.corpus.build import build_corpus
    from medfoundry.corpus.config import CorpusConfig
    from test_corpus_build import _read_split

    out = tmp_path / "out"
    cfg, config = _corpus_config(tmp_path, out, clean={"language": None})  # langid's model alone is > 16 KiB
    argv = [sys.executable, "-m", "medfoundry", "corpus", "build", str(config)]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))  # noqa: E731
    run = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {out}/") and "the file size limit was reached" in error
    assert "run the same command again to resume" in error
    subprocess.run(argv, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    build_corpus(validate(CorpusConfig, dict(cfg, output_dir=str(tmp_path / "reference"))))
    for split in ("train", "val"):
        assert _read_split(out, split) == _read_split(tmp_path / "reference", split)


def test_corpus_build_killed_after_installing_its_splits_resumes_identically(tmp_path):
    """Killed between putting train/ and val/ in place and writing the manifest (while the report is
    drawn): the re-run redoes the finalize pass from the kept extract outputs, to the same documents,
    and leaves no temporary file. (test_corpus_build kills mid-extract and mid-staging.)"""
    from medfoundry.config import validate
    from medfoundry.corpus.build import build_corpus
    from medfoundry.corpus.config import CorpusConfig
    from test_corpus_build import _read_split

    out = tmp_path / "out"
    cfg, config = _corpus_config(tmp_path, out)
    argv = [sys.executable, "-m", "medfoundry", "corpus", "build", str(config)]
    _kill_when(
        subprocess.Popen(
            argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        ),
        lambda: (out / "val").is_dir() and not (out / "manifest.json").exists(),
    )
    assert not (out / "manifest.json").exists()
    subprocess.run(argv, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    build_corpus(validate(CorpusConfig, dict(cfg, output_dir=str(tmp_path / "reference"))))
    for split in ("train", "val"):
        assert _read_split(out, split) == _read_split(tmp_path / "reference", split)  # none lost, none twice
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".staging-")]
