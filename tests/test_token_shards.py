"""Token shards: contents, dtype and EOS choice, determinism across worker counts, resuming, validation."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import shared, smollm2_gguf
from medfoundry.errors import InputError, MedfoundryError
from medfoundry.manifest import output_fingerprint
from medfoundry.model.load import load_backend_tokenizer
from medfoundry.tokenizer.shards import tokenize_corpus
from medfoundry.tokenizer.token_shards import TokenShards

SOURCES = ("pubmed", "pmc", "guidelines")


def read_abstracts(n: int) -> list[str]:
    texts = []
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            text = "\n\n".join(part for part in (row.get("title"), row.get("abstract")) if part)
            if text:
                texts.append(text)
            if len(texts) == n:
                break
    return texts


def write_corpus(root: Path, texts: list[str], parts: dict[str, int]) -> dict[str, list[str]]:
    """A corpus dir as `medfoundry corpus build` writes it, texts dealt evenly over the parts in order."""
    per_part = len(texts) // sum(parts.values())
    by_split, start = {}, 0
    for split, n_parts in parts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        by_split[split] = texts[start : start + n_parts * per_part]
        for p in range(n_parts):
            with gzip.open(root / split / f"part-{p:05d}.jsonl.gz", "wt", encoding="utf-8") as fh:
                for i in range(start, start + per_part):
                    doc = {"id": f"doc{i}", "text": texts[i], "source": SOURCES[i % 3], "meta": {}}
                    fh.write(json.dumps(doc) + "\n")
            start += per_part
    (root / "manifest.json").write_text(json.dumps({"build_key": "test-build-key"}))
    return by_split


def wordlevel_tokenizer(directory: Path, n_words: int, config: dict | None = None, special=()) -> Path:
    """A tiny tokenizer.json whose vocabulary is w0..w{n_words-1} (cheap way to get any vocab size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(special))
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def shard_files(split_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.iterdir()) if p.name.startswith(("part-", "index"))}


@pytest.fixture(scope="module")
def gpt2() -> Path:
    return shared("tokenizers/gpt2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root, read_abstracts(800), {"train": 3, "val": 1})


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, corpus, gpt2) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tokens")
    return out, tokenize_corpus(corpus[0], gpt2, out, workers=2)


def test_shards_hold_each_document_then_eos(tokenized, corpus, gpt2):
    out, manifest = tokenized
    tokenizer = load_backend_tokenizer(gpt2)
    for split, texts in corpus[1].items():
        shards = TokenShards(out / split)
        assert (shards.dtype, shards.eos_id, shards.vocab_size) == (np.dtype("uint16"), 50256, 50257)
        assert shards.num_docs == len(texts) == manifest.counts[f"{split}_documents"]
        assert shards.total_tokens == manifest.counts[f"{split}_tokens"]
        expected = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        position = 0
        for i, ids in enumerate(expected):
            assert shards.document(i).tolist() == ids
            assert shards.slice(position, position + len(ids) + 1).tolist() == ids + [50256]
            position += len(ids) + 1
        assert position == shards.total_tokens
        assert tokenizer.decode(shards.document(7).tolist()) == texts[7]
    assert manifest.stage == "tokens" and manifest.inputs[str(corpus[0])] == output_fingerprint(corpus[0])
    assert manifest.details["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert sum(manifest.details["source_tokens"]["train"].values()) == manifest.counts["train_tokens"]
    assert set(manifest.details["source_tokens"]["train"]) == set(SOURCES)
    assert manifest.counts["tokens_tokenized"] == manifest.counts["train_tokens"] + manifest.counts["val_tokens"]
    index = json.loads((out / "train" / "index.json").read_text())
    assert [s["bin"] for s in index["shards"]] == ["part-00000.bin", "part-00001.bin", "part-00002.bin"]
    assert index["complete"] and index["docs"] == 600


def test_same_shards_whatever_the_worker_count(tokenized, corpus, gpt2, tmp_path):
    tokenize_corpus(corpus[0], gpt2, tmp_path, workers=1)
    for split in ("train", "val"):
        assert shard_files(tmp_path / split) == shard_files(tokenized[0] / split)


def test_rerun_skips_finished_parts_and_rebuilds_damaged_ones(tokenized, corpus, gpt2, tmp_path):
    out = tmp_path / "tokens"
    shutil.copytree(tokenized[0], out)
    original = shard_files(out / "train")
    manifest = tokenize_corpus(corpus[0], gpt2, out, workers=2)
    assert manifest.counts["tokens_tokenized"] == 0

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("part-*")}
    (out / "train" / "part-00001.bin").unlink()
    with open(out / "train" / "part-00002.bin", "r+b") as fh:
        fh.truncate(100)
    manifest = tokenize_corpus(corpus[0], gpt2, out, workers=2)
    assert shard_files(out / "train") == original
    changed = {p.name for p in (out / "train").glob("part-*") if p.stat().st_mtime_ns != mtimes.get(p.name)}
    assert changed == {"part-00001.bin", "part-00001.idx.npy", "part-00002.bin", "part-00002.idx.npy"}
    index = json.loads((out / "train" / "index.json").read_text())
    assert manifest.counts["tokens_tokenized"] == index["shards"][1]["tokens"] + index["shards"][2]["tokens"]


def test_changed_corpus_part_is_retokenized_and_stale_shards_removed(gpt2, tmp_path):
    root = tmp_path / "corpus"
    texts = read_abstracts(300)
    write_corpus(root, texts, {"train": 2, "val": 1})
    tokenize_corpus(root, gpt2, tmp_path / "out", workers=1)
    shutil.rmtree(root / "train")
    by_split = write_corpus(root, texts[::-1], {"train": 1, "val": 2})
    tokenize_corpus(root, gpt2, tmp_path / "out", workers=1)
    train = TokenShards(tmp_path / "out" / "train")
    assert train.num_docs == len(by_split["train"]) == 100
    assert not (tmp_path / "out" / "train" / "part-00001.bin").exists()
    assert TokenShards(tmp_path / "out" / "val").num_docs == 200


def test_dtype_follows_vocabulary_size(gpt2, tmp_path):
    big = wordlevel_tokenizer(tmp_path / "big", 70_000, {"eos_token": "w69999"})
    root = tmp_path / "corpus"
    write_corpus(root, ["w1 w2 w65537", "w69998 w3"], {"train": 1, "val": 1})
    manifest = tokenize_corpus(root, big, tmp_path / "auto", workers=1)
    shards = TokenShards(tmp_path / "auto" / "train")
    assert manifest.details["dtype"] == "uint32" and shards.dtype == np.dtype("uint32")
    assert shards.slice(0, shards.total_tokens).tolist() == [1, 2, 65537, 69999]
    with pytest.raises(MedfoundryError, match="70,000 ids"):
        tokenize_corpus(root, big, tmp_path / "u16", dtype="uint16", workers=1)

    gpt2_root = tmp_path / "gpt2_corpus"
    write_corpus(gpt2_root, read_abstracts(20), {"train": 1, "val": 1})
    tokenize_corpus(gpt2_root, gpt2, tmp_path / "g16", workers=1)
    tokenize_corpus(gpt2_root, gpt2, tmp_path / "g32", dtype="uint32", workers=1)
    u16, u32 = TokenShards(tmp_path / "g16" / "train"), TokenShards(tmp_path / "g32" / "train")
    assert (u16.dtype, u32.dtype) == (np.dtype("uint16"), np.dtype("uint32"))
    assert np.array_equal(u16.slice(0, u16.total_tokens), u32.slice(0, u32.total_tokens))


def test_eos_comes_from_argument_then_config(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root, ["w1 w2", "w3"], {"train": 1, "val": 1})
    configured = wordlevel_tokenizer(tmp_path / "configured", 10, {"eos_token": {"content": "w9"}})
    assert tokenize_corpus(root, configured, tmp_path / "a", workers=1).details["tokenizer"]["eos_id"] == 9
    assert (
        tokenize_corpus(root, configured, tmp_path / "b", eos_token="w8", workers=1).details["tokenizer"]["eos_id"] == 8
    )
    with pytest.raises(MedfoundryError, match="pass eos_token"):
        tokenize_corpus(root, wordlevel_tokenizer(tmp_path / "bare", 10), tmp_path / "c", workers=1)
    with pytest.raises(MedfoundryError, match="'</s>' is not in the vocabulary"):
        tokenize_corpus(root, configured, tmp_path / "d", eos_token="</s>", workers=1)


def test_eos_text_inside_a_document_is_not_a_document_end(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root, ["w1 <eos> w2", "w3"], {"train": 1, "val": 1})
    tokenizer = wordlevel_tokenizer(tmp_path / "tok", 10, {"eos_token": "<eos>"}, special=["<eos>"])
    tokenize_corpus(root, tokenizer, tmp_path / "out", workers=1)
    shards = TokenShards(tmp_path / "out" / "train")
    assert shards.slice(0, shards.total_tokens).tolist() == [1, 0, 2, 10] and shards.num_docs == 1


def test_missing_inputs_are_named(corpus, gpt2, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as err:
        tokenize_corpus(corpus[0], tmp_path / "empty", tmp_path / "out")
    assert err.value.path == str(tmp_path / "empty")
    with pytest.raises(InputError) as err:
        tokenize_corpus(tmp_path, gpt2, tmp_path / "out")
    assert err.value.path == str(tmp_path / "train")
    write_corpus(tmp_path / "bad", ["one", "two"], {"train": 1, "val": 1})
    with gzip.open(tmp_path / "bad" / "val" / "part-00000.jsonl.gz", "at") as fh:
        fh.write('{"id": "x", "source": "pubmed"}\n')
    with pytest.raises(InputError, match=r"val/part-00000.jsonl.gz:2: not a corpus document with a text field"):
        tokenize_corpus(tmp_path / "bad", gpt2, tmp_path / "out", workers=1)


def test_token_shards_reject_files_that_disagree_with_the_index(tokenized, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(tokenized[0] / "train", split)
    index = json.loads((split / "index.json").read_text())
    tokens = index["shards"][1]["tokens"]
    with open(split / "part-00001.bin", "r+b") as fh:
        fh.truncate(2000)
    with pytest.raises(
        InputError,
        match=rf"part-00001.bin: index says {tokens:,} tokens \({2 * tokens:,} bytes\) "
        "but the file has 2,000 bytes",
    ):
        TokenShards(split)

    shutil.copy(tokenized[0] / "train" / "part-00001.bin", split)
    index["shards"][2]["docs"] += 1
    (split / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="part-00002.idx.npy: index says 201 documents but the file has 200 offsets"):
        TokenShards(split)

    index["shards"][2]["docs"] -= 1
    (split / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(InputError, match="did not finish"):
        TokenShards(split)
    os.remove(split / "index.json")
    with pytest.raises(InputError, match="no index.json"):
        TokenShards(split)


def test_slice_spans_shard_boundaries(tokenized):
    split = tokenized[0] / "train"
    shards = TokenShards(split)
    bins = [np.fromfile(split / f"part-{p:05d}.bin", dtype="<u2") for p in range(3)]
    everything = np.concatenate(bins)
    assert np.array_equal(shards.slice(0, shards.total_tokens), everything)
    boundary = len(bins[0])
    assert np.array_equal(shards.slice(boundary - 5, boundary + 5), np.concatenate([bins[0][-5:], bins[1][:5]]))
    whole_middle = shards.slice(boundary - 1, boundary + len(bins[1]) + 1)
    assert np.array_equal(whole_middle, everything[boundary - 1 : boundary + len(bins[1]) + 1])
    assert shards.slice(10, 10).size == 0
    with pytest.raises(IndexError):
        shards.slice(0, shards.total_tokens + 1)
    with pytest.raises(IndexError):
        shards.document(shards.num_docs)


def test_a_gguf_model_file_serves_as_the_tokenizer(tmp_path, monkeypatch):
    """Continued pretraining of a GGUF model: its embedded tokenizer tokenizes the corpus, with the model's own
    end-of-sequence token, and its weights are never dequantized for it (only the tokenizer is cached)."""
    from medfoundry.model.load import tokenizer_directory

    monkeypatch.setenv("MEDFOUNDRY_CACHE", str(tmp_path / "cache"))
    gguf = smollm2_gguf()
    root = tmp_path / "corpus"
    texts = read_abstracts(6)
    write_corpus(root, texts, {"train": 1, "val": 1})
    manifest = tokenize_corpus(root, gguf, tmp_path / "tokens", workers=1)
    directory = tokenizer_directory(gguf)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["gguf-tokenizer"]
    assert not any(p.suffix == ".safetensors" for p in directory.iterdir())
    tokenizer = load_backend_tokenizer(directory)
    shards = TokenShards(tmp_path / "tokens" / "train")
    assert manifest.details["tokenizer"]["eos_token"] == "<|im_end|>" and shards.eos_id == tokenizer.token_to_id(
        "<|im_end|>"
    )
    assert shards.document(0).tolist() == tokenizer.encode(texts[0], add_special_tokens=False).ids


def test_manifest_reports_the_tokenize_stage_and_the_tasks_leave_nothing(tokenized):
    out, manifest = tokenized
    stage = manifest.details["stages"]["tokenize"]
    assert stage["tasks"] == 4  # one per corpus part, both splits
    assert stage["seconds"] > 0 and 30 < stage["peak_rss_mb"] < 4000
    assert manifest.config["executor"]["kind"] == "local"
    assert [p.name for p in (out / ".work").iterdir()] == ["digests.json"]  # no task logs or entries left


def _interrupt_at(monkeypatch, victim: str):
    """Make the task of corpus part ``victim`` (``split/part-XXXXX``) fail, as a kill would stop it."""
    import medfoundry.tokenizer.shards as shards

    real = shards._tokenize_part

    def failing(tokenizer, part, split_dir, header, digest):
        if f"{split_dir.name}/{shards._shard_name(part)}" == victim:
            raise RuntimeError("interrupted")
        return real(tokenizer, part, split_dir, header, digest)

    monkeypatch.setattr(shards, "_tokenize_part", failing)


def test_a_rerun_skips_the_finished_tasks_of_its_inputs_only(tokenized, corpus, gpt2, tmp_path, monkeypatch):
    """The tasks' completion marks count for a rerun with the same inputs; after a corpus part changed
    they are another build's, and every part is tokenized again."""
    root = tmp_path / "corpus"
    shutil.copytree(corpus[0], root)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "train/part-00002")
        with pytest.raises(RuntimeError, match="interrupted"):
            tokenize_corpus(root, gpt2, tmp_path / "a", workers=1)
    assert not json.loads((tmp_path / "a" / "train" / "index.json").read_text())["complete"]
    assert len(list((tmp_path / "a").glob(".work/logs-*/completions/*"))) == 2
    manifest = tokenize_corpus(root, gpt2, tmp_path / "a", workers=1)
    reference = json.loads((tokenized[0] / "train" / "index.json").read_text())["shards"]
    assert manifest.counts["tokens_tokenized"] == reference[2]["tokens"] + tokenized[1].counts["val_tokens"]
    for split in ("train", "val"):
        assert shard_files(tmp_path / "a" / split) == shard_files(tokenized[0] / split)

    with monkeypatch.context() as patch:
        _interrupt_at(patch, "train/part-00002")
        with pytest.raises(RuntimeError, match="interrupted"):
            tokenize_corpus(root, gpt2, tmp_path / "b", workers=1)
    texts = read_abstracts(850)[800:]  # part-00000 gets other documents
    with gzip.open(root / "train" / "part-00000.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(
            json.dumps({"id": f"n{i}", "text": t, "source": "pubmed", "meta": {}}) + "\n" for i, t in enumerate(texts)
        )
    manifest = tokenize_corpus(root, gpt2, tmp_path / "b", workers=1)
    assert manifest.counts["tokens_tokenized"] == manifest.counts["train_tokens"] + manifest.counts["val_tokens"]
    fresh = tokenize_corpus(root, gpt2, tmp_path / "fresh", workers=2)
    assert fresh.counts == {**manifest.counts}
    for split in ("train", "val"):
        assert shard_files(tmp_path / "b" / split) == shard_files(tmp_path / "fresh" / split)


FAKE_SLURM = Path(__file__).parent / "fixtures" / "fake_slurm"


def test_slurm_executor_submits_then_assembles_on_rerun(tokenized, corpus, gpt2, tmp_path, monkeypatch):
    """On a cluster: the first run submits one array task per part and returns (Pending); a rerun while
    squeue lists the job submits nothing; once the tasks ran, a rerun writes the same shards as locally."""
    import sys

    from medfoundry.errors import Pending
    from medfoundry.executor import ExecutorConfig

    state = tmp_path / "slurm_state"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setenv("MEDFOUNDRY_NO_TCMALLOC", "1")
    executor = ExecutorConfig(kind="slurm", slurm={"partition": "bio", "time": "00:30:00"})
    out = tmp_path / "cluster"

    monkeypatch.setenv("FAKE_SLURM_RUN", "0")
    with pytest.raises(Pending, match="4 of 4 tokenize tasks are not finished"):
        tokenize_corpus(corpus[0], gpt2, out, workers=1, executor=executor)
    array_script = sorted(state.glob("job-*.slurm"))[0].read_text()
    assert "#SBATCH --array=0-3" in array_script and "#SBATCH --partition=bio" in array_script
    assert not json.loads((out / "train" / "index.json").read_text())["complete"]
    assert not (out / "manifest.json").exists()

    monkeypatch.setenv("FAKE_SLURM_ACTIVE", "1")
    writing = out / "train" / ".part-00001.bin.x1y2.tmp"  # a running task's atomic write: left alone
    writing.write_bytes(b"partial")
    with pytest.raises(Pending, match="slurm job 1000 is still running the tokenize tasks"):
        tokenize_corpus(corpus[0], gpt2, out, workers=1, executor=executor)
    assert writing.exists()
    submitted = len(list(state.glob("job-*.slurm")))

    monkeypatch.setenv("FAKE_SLURM_ACTIVE", "0")
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")  # the resubmitted job's tasks run (as the cluster would)
    manifest = tokenize_corpus(corpus[0], gpt2, out, workers=1, executor=executor)
    assert len(list(state.glob("job-*.slurm"))) > submitted
    for split in ("train", "val"):
        assert shard_files(out / split) == shard_files(tokenized[0] / split)
    assert manifest.counts == tokenized[1].counts
    assert manifest.details["stages"]["tokenize"]["tasks"] == 4
    assert manifest.config["executor"]["kind"] == "slurm"
    assert not list(out.rglob("*.tmp")) and [p.name for p in (out / ".work").iterdir()] == ["digests.json"]
