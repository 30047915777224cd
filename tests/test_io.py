"""Folders against a power cut (issue 18), simulated by ``benchmarks/power_loss.py``: fsyncs are recorded, then
whatever was not flushed is lost (files cut to their last fsynced size, renames whose parent folder was not
fsynced undone). A folder written through ``atomic_dir`` (a model export, a tokenizer, the GGUF cache) is
then complete or absent, never there with empty files; the GGUF cache trusts a folder only with its
completion record and every file at its recorded size."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO
from medfoundry.io import atomic_dir

sys.path.insert(0, str(REPO / "benchmarks"))
from power_loss import PowerLoss


def _write_folder(final: Path) -> None:
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text('{"layers": 2}')
        (tmp / "weights").mkdir()
        (tmp / "weights" / "part-0.bin").write_bytes(bytes(range(256)) * 16)


@pytest.mark.parametrize("synced", [False, True], ids=["without fsyncs", "with fsyncs"])
def test_a_power_cut_never_leaves_an_atomic_dir_with_empty_files(tmp_path, monkeypatch, synced):
    """Without fsyncing its contents (as before), the cut leaves the folder under its final name with empty
    files: what the simulation must catch. With them, it is there whole."""
    if not synced:
        monkeypatch.setattr("medfoundry.io.sync_tree", lambda root: None)
    final = tmp_path / "out"
    with PowerLoss(tmp_path) as cut:
        _write_folder(final)
    lost = cut.lose([final])
    if synced:
        assert lost == [] and json.loads((final / "config.json").read_text()) == {"layers": 2}
        assert (final / "weights" / "part-0.bin").read_bytes() == bytes(range(256)) * 16
    else:
        assert (final / "config.json").read_bytes() == b"" and len(lost) == 2


SENTENCE = "the patient was treated with insulin for type two diabetes and the tumour responded to therapy"


def _corpus(root: Path) -> Path:
    """A corpus folder in ``corpus build``'s format, of made-up sentences."""
    words = SENTENCE.split()
    for split, n in (("train", 120), ("val", 10)):
        (root / split).mkdir(parents=True)
        with gzip.open(root / split / "part-00000.jsonl.gz", "wt") as fh:
            for i in range(n):
                text = " ".join(words[(i + k) % len(words)] for k in range(30))
                fh.write(json.dumps({"id": f"{split}/{i}", "text": text, "source": "made-up", "meta": {}}) + "\n")
    (root / "manifest.json").write_text("{}")
    return root


def _tokenizer(corpus: Path, out: Path) -> Path:
    from medfoundry.config import validate
    from medfoundry.tokenizer.config import TokenizerTrainConfig
    from medfoundry.tokenizer.train import train_tokenizer

    cfg = {"corpus_dir": str(corpus), "output_dir": str(out), "vocab_size": 300, "fertility": {"top_domain_words": 0}}
    train_tokenizer(validate(TokenizerTrainConfig, cfg))
    return out


def _tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )


def test_a_tokenizer_and_a_model_export_survive_a_power_cut(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medfoundry.model.export import export_hf

    corpus = _corpus(tmp_path / "corpus")
    with PowerLoss(tmp_path) as cut:
        tokenizer = _tokenizer(corpus, tmp_path / "tokenizer")
        model = export_hf(_tiny_model(), tokenizer, tmp_path / "model")
    assert cut.lose([tokenizer, model]) == []
    assert AutoTokenizer.from_pretrained(model)("the patient")["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(model).config.n_layer == 1


def test_the_gguf_cache_is_trusted_only_complete(tmp_path, monkeypatch):
    """A conversion survives a power cut whole, and is trusted; a cache folder with ``config.json`` but
    emptied weights and no completion record (what a conversion that did not fsync, before, could leave),
    or whose record lists a file at another size, is converted again."""
    from medfoundry.model.export import export_hf
    from medfoundry.model.load import CONVERTED, gguf_checkpoint

    tokenizer = _tokenizer(_corpus(tmp_path / "corpus"), tmp_path / "tokenizer")
    conversions = []

    def convert_gguf(gguf_path, out_dir, dtype="float32"):  # convert_gguf, with a dequantized model at hand
        conversions.append(out_dir)
        return export_hf(_tiny_model(), tokenizer, out_dir, dtype=dtype)

    monkeypatch.setattr("medfoundry.model.convert.convert_gguf", convert_gguf)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    with PowerLoss(tmp_path) as cut:
        out = gguf_checkpoint(gguf, tmp_path / "cache")
    assert cut.lose([out]) == []
    assert gguf_checkpoint(gguf, tmp_path / "cache") == out and len(conversions) == 1

    weights = out / "model.safetensors"
    size = weights.stat().st_size
    (out / CONVERTED).unlink()
    os.truncate(weights, 0)
    assert gguf_checkpoint(gguf, tmp_path / "cache") == out and len(conversions) == 2
    assert weights.stat().st_size == size

    os.truncate(weights, size // 2)
    assert gguf_checkpoint(gguf, tmp_path / "cache") == out and len(conversions) == 3
    assert weights.stat().st_size == size
