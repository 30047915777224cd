"""Progress bars where a user waits: tokenizer training, tokenization and the corpus build's finalize step.

The bars follow tqdm's ``disable=None``: shown when stderr is a terminal. The tests make it one (a
StringIO that says it is a TTY; a pseudo-terminal for the tokenizer trainer, which draws from Rust)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pty
import re
import subprocess
import sys

from tqdm import tqdm

from conftest import REPO, shared
from medfoundry.config import validate
from medfoundry.corpus.build import build_corpus
from medfoundry.corpus.config import CorpusConfig
from medfoundry.tokenizer.shards import tokenize_corpus
from test_tokenizer_train import write_corpus


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch) -> _Terminal:
    """Set in the test itself: pytest puts its own capture back on sys.stderr after the fixtures' setup."""
    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    return stderr


def test_tokenize_shows_bytes_of_parts_done(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", 200, 20)
    terminal = _terminal(monkeypatch)
    tokenize_corpus(corpus, shared("tokenizers/gpt2"), tmp_path / "tokens", workers=1)
    size = tqdm.format_sizeof(sum(p.stat().st_size for p in corpus.glob("*/part-*.jsonl.gz")))
    final = terminal.getvalue().strip().split("\r")[-1]
    assert final.startswith("tokenize: 100%") and f"{size}/{size} [" in final


def test_corpus_build_shows_finalize(tmp_path, monkeypatch):
    source = tmp_path / "abstracts.jsonl.gz"
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt") as fh, gzip.open(source, "wt") as out:
        out.writelines(line for _, line in zip(range(60), fh))
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "workers": 1,
        "decontam": {"enabled": False},
        "dedup": {"near": {"enabled": False}},
        "sources": [{"name": "a", "kind": "jsonl", "paths": [str(source)], "fields": {"text": ["abstract"]}}],
    }
    terminal = _terminal(monkeypatch)
    build_corpus(validate(CorpusConfig, cfg))
    bars = terminal.getvalue()
    assert "extract: 100%" in bars and "finalize: 100%" in bars and "3/3 [" in bars.split("finalize")[-1]


TRAIN = r"""
import gzip, json
from medfoundry.tokenizer.config import TokenizerTrainConfig
from medfoundry.tokenizer.train import train_bpe
with gzip.open({path!r}, "rt") as fh:
    texts = [json.loads(line)["abstract"] for _, line in zip(range(300), fh)]
train_bpe(TokenizerTrainConfig(corpus_dir="-", output_dir="-", vocab_size=400), iter(texts), documents=len(texts))
"""


def _stderr_on_a_terminal(code: str) -> str:
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=child, stdout=subprocess.DEVNULL, cwd=REPO)
    os.close(child)
    out = b""
    while chunk := _read(main):
        out += chunk
    os.close(main)
    assert proc.wait(timeout=120) == 0, out[-2000:]
    return out.decode(errors="replace")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError:  # EIO: the child closed the terminal
        return b""


def test_tokenizer_training_shows_documents_read_and_merges():
    bars = _stderr_on_a_terminal(TRAIN.format(path=str(shared("corpus/pubmed_abstracts.jsonl.gz"))))
    assert re.search(r"Pre-processing sequences .* 300 +/ +300", bars) and "Compute merges" in bars


def test_train_documents_come_from_the_corpus_manifest(tmp_path):
    from medfoundry.tokenizer.config import TokenizerTrainConfig
    from medfoundry.tokenizer.train import train_documents

    per_source = {"abstracts": {"docs": 70, "chars": 1}, "replay": {"docs": 5, "chars": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps({"details": {"per_source": {"train": per_source}}}))
    cfg = {"corpus_dir": str(tmp_path), "output_dir": "-"}
    assert train_documents(validate(TokenizerTrainConfig, cfg)) == 75
    assert train_documents(validate(TokenizerTrainConfig, {**cfg, "sources": ["replay"]})) == 5
    (tmp_path / "manifest.json").write_text("{}")
    assert train_documents(validate(TokenizerTrainConfig, cfg)) is None
