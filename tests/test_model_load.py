"""model/load.py, the one resolver: GGUF files become one cached Hugging Face directory shared by every stage,
converted once (also by concurrent processes) and again when the file changes; tokenizers load through one
function whatever the reference."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from conftest import shared, smollm2_gguf
from medfoundry.errors import InputError
from medfoundry.model import load as model_load


@pytest.fixture
def fake_convert(monkeypatch):
    """Records conversions; each writes a minimal checkpoint after a pause (so concurrent callers overlap)."""
    calls = []

    def convert(gguf_path, out):
        calls.append(gguf_path)
        time.sleep(0.2)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({}))

    monkeypatch.setattr("medfoundry.model.convert.convert_gguf", convert)
    return calls


def test_gguf_is_converted_once_into_the_cache(tmp_path, fake_convert):
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    first = model_load.gguf_checkpoint(gguf, tmp_path / "cache")
    assert model_load.gguf_checkpoint(gguf, tmp_path / "cache") == first and len(fake_convert) == 1
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("tiny.Q4-")
    with pytest.raises(InputError, match="missing.gguf: GGUF file not found"):
        model_load.gguf_checkpoint(tmp_path / "missing.gguf", tmp_path / "cache")


def test_a_replaced_gguf_file_is_converted_again(tmp_path, fake_convert):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    first = model_load.gguf_checkpoint(gguf, tmp_path / "cache")
    gguf.write_bytes(b"GGUF, other weights")
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = model_load.gguf_checkpoint(gguf, tmp_path / "cache")
    assert second != first and len(fake_convert) == 2


def test_concurrent_callers_convert_once(tmp_path, fake_convert):
    """torchrun ranks resolving the same init_from at the same time: one conversion, one directory."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(model_load.gguf_checkpoint(gguf, tmp_path / "cache")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_convert) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()


def test_a_gguf_tokenizer_is_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """Every load of a GGUF's tokenizer after the first reads the cached tokenizer.json: parsing the metadata
    takes seconds (SmolLM2's 49k-token vocabulary), and a cached folder is only trusted with its record."""
    from transformers import PreTrainedTokenizerFast

    calls = []

    def convert(gguf_path, out):
        calls.append(gguf_path)
        backend = model_load.load_backend_tokenizer(shared("tokenizers/gpt2"))
        PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(out)

    monkeypatch.setenv("MEDFOUNDRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("medfoundry.model.convert.convert_gguf_tokenizer", convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    directory = model_load.tokenizer_directory(gguf)
    assert directory.parent == tmp_path / "cache" / "gguf-tokenizer"
    assert model_load.load_tokenizer(gguf).encode("hello world") == [31373, 995]
    assert model_load.load_backend_tokenizer(gguf).encode("hello world").ids == [31373, 995]
    assert model_load.tokenizer_directory(gguf) == directory and len(calls) == 1
    (directory / model_load.CONVERTED).unlink()  # an interrupted conversion is done again
    model_load.load_tokenizer(gguf)
    assert len(calls) == 2


def test_hf_directory_uses_the_cache_root(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setenv("MEDFOUNDRY_CACHE", str(tmp_path / "root"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_load.hf_directory(gguf).parent == tmp_path / "root" / "gguf"
    assert model_load.hf_directory(tmp_path) == tmp_path  # a folder is itself
    assert model_load.is_gguf("a/b.gguf") and not model_load.is_gguf("a/b")


def test_one_tokenizer_loader_for_folders_gguf_and_loaded_tokenizers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    backend = model_load.load_backend_tokenizer(shared("tokenizers/gpt2"))  # GPT-2's vocab.json + merges.txt
    assert backend.encode("hello world").ids == [31373, 995]
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "gpt2")
    gpt2 = model_load.load_tokenizer(tmp_path / "gpt2")
    assert gpt2.is_fast and gpt2.encode("hello world") == [31373, 995]
    assert model_load.load_tokenizer(gpt2) is gpt2
    smol = model_load.load_tokenizer(smollm2_gguf())
    assert smol.is_fast and smol.decode(smol.encode("Aspirin inhibits COX-1.")) == "Aspirin inhibits COX-1."
    assert model_load.load_backend_tokenizer(smollm2_gguf()).get_vocab_size() == len(smol)


def test_tokenizer_references_that_are_not_there_are_named(tmp_path):
    with pytest.raises(InputError, match="nowhere: tokenizer not found"):
        model_load.load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(InputError, match="gone.gguf: GGUF file not found"):
        model_load.load_tokenizer(tmp_path / "gone.gguf")
    with pytest.raises(InputError, match="not a tokenizer directory"):
        model_load.load_backend_tokenizer(tmp_path)
