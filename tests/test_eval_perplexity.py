"""Held-out perplexity: lm-eval parity on real abstracts (GPT-2, LLaMA), windows, strides, batching, shards, inputs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from conftest import shared
from medfoundry.errors import ConfigError, InputError, MedfoundryError
from medfoundry.eval.perplexity import (
    PerplexityResult,
    iter_eval_texts,
    rolling_windows,
    shard_perplexity,
    text_perplexity,
)
from medfoundry.model.export import export_hf
from medfoundry.model.presets import model_config
from test_token_shards import read_abstracts, write_corpus

GPT2_LENGTH = 64  # abstracts run to 100-500 GPT-2 tokens: most need several windows
LLAMA_LENGTH = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def load(directory: Path):
    return (
        AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(directory),
    )


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Six real abstracts, a title alone (one short window) and an empty document (no tokens, one lm-eval word)."""
    texts = read_abstracts(6)
    return [*texts, texts[0].split("\n\n")[0], ""]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A random tiny GPT-2 exported with the real GPT-2 tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("gpt2-tiny", vocab_size=50_257, context=128))
    return export_hf(model, shared("tokenizers/gpt2"), tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load(gpt2_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA with a 512-token BPE that adds BOS like LLaMA's, trained until it has memorized four real
    abstracts: unlike a random model, it predicts better with more context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(
        read_abstracts(300),
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config(
            "llama-tiny", vocab_size=len(tokenizer), context=128, overrides={"bos_token_id": 0, "eos_token_id": 1}
        )
    )
    _memorize(model, tokenizer, read_abstracts(4))
    out = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _memorize(model, tokenizer, texts: list[str], steps: int = 100) -> None:
    ids = torch.tensor([i for doc in tokenizer(texts)["input_ids"] for i in doc])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 64, (8,))
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def lm_eval_rolling(model_dir: Path, texts: list[str], max_length: int, **kwargs) -> list[float]:
    """Per-document log-likelihoods from lm-eval's HFLM.loglikelihood_rolling."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", max_length=max_length, batch_size=4, **kwargs)
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    return lm.loglikelihood_rolling(requests, disable_tqdm=True)


# -- windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length,stride", [(1, 1), (7, 7), (7, 3), (7, 1), (64, 64), (64, 16)])
def test_windows_are_lm_evals_rolling_windows(max_length, stride):
    """stride == max_length: lm-eval's disjoint windows as HFLM feeds them to the model (left-truncated to
    max_length + 1 tokens, last dropped); a smaller stride: its overlapping windows with context_len =
    max_length - stride + 1. Either way each token is scored exactly once."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    prefix = -1
    for n in range(0, 3 * max_length + 5):
        tokens = list(range(n))
        seq = [prefix, *tokens]
        ours = [
            (seq[start:end], seq[end - scored + 1 : end + 1])
            for start, end, scored in rolling_windows(n, max_length, stride)
        ]
        windows = get_rolling_token_windows(tokens, prefix, max_length, max_length - stride + 1)
        if stride == max_length:
            theirs = [((a + b)[-(max_length + 1) :][:-1], b) for a, b in map(make_disjoint_window, windows)]
        else:
            theirs = list(windows)
        assert ours == theirs
        assert [t for _, scored in ours for t in scored] == tokens


# -- parity with lm-eval -----------------------------------------------------------------------


def test_gpt2_matches_lm_eval_per_document_and_in_aggregate(gpt2_dir, gpt2, docs):
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.api.task import ConfigurableTask

    model, tokenizer = gpt2
    theirs = lm_eval_rolling(gpt2_dir, docs, GPT2_LENGTH)
    ours = [text_perplexity(model, tokenizer, [doc], max_length=GPT2_LENGTH).nll for doc in docs]
    assert ours == pytest.approx([-ll for ll in theirs], rel=1e-6, abs=1e-4)
    assert max(len(tokenizer(doc)["input_ids"]) for doc in docs) > 4 * GPT2_LENGTH

    result = text_perplexity(model, tokenizer, docs, max_length=GPT2_LENGTH, batch_size=8)
    words = [(ll, ConfigurableTask.count_words(doc)) for ll, doc in zip(theirs, docs)]
    utf8 = [(ll, ConfigurableTask.count_bytes(doc)) for ll, doc in zip(theirs, docs)]
    assert (result.documents, result.words) == (len(docs), sum(w for _, w in words))
    assert result.bytes == sum(b for _, b in utf8)
    assert result.tokens == sum(len(tokenizer(doc)["input_ids"]) for doc in docs)
    assert result.word_perplexity == pytest.approx(weighted_perplexity(words), rel=1e-6)
    assert result.byte_perplexity == pytest.approx(weighted_perplexity(utf8), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(bits_per_byte(utf8), rel=1e-6)


def test_llama_matches_lm_eval_with_a_bos_adding_tokenizer(llama_dir, docs):
    """Texts are encoded without special tokens behind the BOS prefix: lm-eval's totals with add_bos_token=False
    (by default it would also score the tokenizer's own BOS after the prefix BOS)."""
    model, tokenizer = load(llama_dir)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    texts = docs[:4]
    theirs = lm_eval_rolling(llama_dir, texts, LLAMA_LENGTH, add_bos_token=False)
    ours = [text_perplexity(model, tokenizer, [text], max_length=LLAMA_LENGTH).nll for text in texts]
    assert ours == pytest.approx([-ll for ll in theirs], rel=1e-6, abs=1e-4)


# -- strides, batching, precision --------------------------------------------------------------


def test_more_context_lowers_perplexity_and_matches_a_plain_loop(llama_dir, docs):
    model, tokenizer = load(llama_dir)
    texts = docs[:4]
    disjoint = text_perplexity(model, tokenizer, texts, max_length=LLAMA_LENGTH)
    assert text_perplexity(model, tokenizer, texts, max_length=LLAMA_LENGTH, stride=LLAMA_LENGTH) == disjoint
    strided = text_perplexity(model, tokenizer, texts, max_length=LLAMA_LENGTH, stride=8, batch_size=5)
    assert strided.tokens == disjoint.tokens
    assert strided.token_perplexity < 0.97 * disjoint.token_perplexity
    assert strided.nll == pytest.approx(_plain_loop(model, tokenizer, texts, LLAMA_LENGTH, 8), rel=1e-6)


def _plain_loop(model, tokenizer, texts, max_length: int, stride: int) -> float:
    """The strided NLL computed the obvious way: one window per forward, full logits, cross-entropy."""
    total = 0.0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([tokenizer.bos_token_id, *ids])
        for start, end, scored in rolling_windows(len(ids), max_length, stride):
            with torch.no_grad():
                logits = model(input_ids=seq[start:end].unsqueeze(0)).logits[0, -scored:]
            total += torch.nn.functional.cross_entropy(logits, seq[end - scored + 1 : end + 1], reduction="sum").item()
    return total


@pytest.mark.parametrize("stride", [GPT2_LENGTH, 24])
def test_batch_size_does_not_change_the_result(gpt2, docs, stride):
    model, tokenizer = gpt2
    one = text_perplexity(model, tokenizer, docs, max_length=GPT2_LENGTH, stride=stride, batch_size=1)
    eight = text_perplexity(model, tokenizer, docs, max_length=GPT2_LENGTH, stride=stride, batch_size=8)
    counts = [(r.documents, r.tokens, r.words, r.bytes) for r in (one, eight)]
    assert counts[0] == counts[1]
    assert eight.nll == pytest.approx(one.nll, rel=1e-6)


def test_bf16_is_close_to_fp32(gpt2, docs):
    model, tokenizer = gpt2
    fp32 = text_perplexity(model, tokenizer, docs[:3], max_length=GPT2_LENGTH)
    bf16 = text_perplexity(model, tokenizer, docs[:3], max_length=GPT2_LENGTH, precision="bf16")
    assert bf16.nll == pytest.approx(fp32.nll, rel=1e-2)
    assert next(model.parameters()).dtype == torch.float32  # autocast only: the weights are left alone


def test_model_mode_is_restored(gpt2, docs):
    model, tokenizer = gpt2
    model.train()
    try:
        text_perplexity(model, tokenizer, docs[:1], max_length=GPT2_LENGTH)
        assert model.training
    finally:
        model.eval()


def test_refuses_a_model_that_transforms_its_logits(gpt2_dir):
    class Scaled(GPT2LMHeadModel):  # stands for logit scaling / soft-capping models (Cohere, Gemma 2)
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = Scaled.from_pretrained(gpt2_dir).eval()
    with pytest.raises(MedfoundryError, match="soft-capping or scaling"):
        text_perplexity(model, AutoTokenizer.from_pretrained(gpt2_dir), ["Some text."], max_length=GPT2_LENGTH)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_length": 0}, "max_length must be at least 1"),
        ({"max_length": 8, "stride": 9}, "stride must be between 1 and max_length"),
        ({"max_length": 8, "stride": 0}, "stride must be between 1 and max_length"),
        ({"max_length": 8, "batch_size": 0}, "batch_size must be at least 1"),
        ({"max_length": 8, "precision": "fp16"}, "precision must be one of fp32, bf16"),
    ],
)
def test_bad_settings(gpt2, kwargs, message):
    model, tokenizer = gpt2
    with pytest.raises(ConfigError, match=message):
        text_perplexity(model, tokenizer, ["text"], **kwargs)


# -- token shards ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus dir, token shards dir) of 12 real abstracts (4 train, 8 val), tokenized with GPT-2's tokenizer."""
    from medfoundry.tokenizer.shards import tokenize_corpus

    root = tmp_path_factory.mktemp("shards")
    write_corpus(root / "corpus", read_abstracts(12), {"train": 1, "val": 2})
    tokenize_corpus(root / "corpus", shared("tokenizers/gpt2"), root / "tokens", workers=1)
    return root / "corpus", root / "tokens"


def test_shards_score_like_their_texts(gpt2, shards):
    model, tokenizer = gpt2
    corpus, tokens = shards
    from_texts = text_perplexity(model, tokenizer, iter_eval_texts(corpus), max_length=GPT2_LENGTH, stride=32)
    from_shards = shard_perplexity(model, tokens / "val", max_length=GPT2_LENGTH, stride=32, tokenizer=tokenizer)
    assert from_shards.documents == from_texts.documents == 8
    counts = (from_texts.tokens, from_texts.words, from_texts.bytes)
    assert (from_shards.tokens, from_shards.words, from_shards.bytes) == counts
    assert from_shards.nll == pytest.approx(from_texts.nll, rel=1e-6)

    tokens_only = shard_perplexity(model, tokens / "val", max_length=GPT2_LENGTH, stride=32)
    assert tokens_only.nll == pytest.approx(from_shards.nll, rel=1e-6) and tokens_only.words == tokens_only.bytes == 0
    assert tokens_only.token_perplexity == pytest.approx(from_shards.token_perplexity, rel=1e-6)
    assert tokens_only.word_perplexity is None and tokens_only.bits_per_byte is None


def test_shard_token_limit_takes_whole_documents(gpt2, shards):
    model, tokenizer = gpt2
    corpus, tokens = shards
    first = len(tokenizer(next(iter_eval_texts(corpus)))["input_ids"])
    assert shard_perplexity(model, tokens / "val", max_length=GPT2_LENGTH, limit_tokens=1).tokens == first
    two = shard_perplexity(model, tokens / "val", max_length=GPT2_LENGTH, limit_tokens=first + 1)
    assert two.documents == 2 and two.tokens > first + 1


def test_shard_directory_errors(gpt2, shards, tmp_path):
    model, _ = gpt2
    _, tokens = shards
    with pytest.raises(InputError, match="pass one split"):
        shard_perplexity(model, tokens, max_length=GPT2_LENGTH)
    with pytest.raises(InputError, match="no index.json"):
        shard_perplexity(model, tmp_path, max_length=GPT2_LENGTH)
    with pytest.raises(ConfigError, match="limit_tokens"):
        shard_perplexity(model, tokens / "val", max_length=GPT2_LENGTH, limit_tokens=0)
    small = AutoModelForCausalLM.from_config(model_config("gpt2-tiny"))
    with pytest.raises(InputError, match="50,257-token vocabulary but the model has 4,096 outputs"):
        shard_perplexity(small, tokens / "val", max_length=GPT2_LENGTH)


# -- texts -------------------------------------------------------------------------------------


def test_eval_texts_from_each_kind_of_input(tmp_path, shards):
    corpus, _ = shards
    rows = [{"text": "first doc"}, {"text": "second\n\ndoc", "other": 1}, {"text": "third"}]
    lines = "".join(json.dumps(row) + "\n" for row in rows[:2]) + "\n" + json.dumps(rows[2]) + "\n"
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "a.txt").write_text("\n\nPara one,\nline two.\r\n\n  \n\nPara two.\n")
    (tmp_path / "whole.txt").write_text("one document\nof two lines")

    texts = [row["text"] for row in rows]
    assert list(iter_eval_texts(tmp_path / "a.jsonl")) == texts
    assert list(iter_eval_texts(tmp_path / "a.jsonl.gz", limit=2)) == texts[:2]
    assert list(iter_eval_texts(tmp_path / "b.jsonl", text_field="body")) == ["x"]
    assert list(iter_eval_texts(tmp_path / "a.txt")) == ["Para one,\nline two.", "Para two."]
    assert list(iter_eval_texts(tmp_path / "whole.txt")) == ["one document\nof two lines"]
    assert len(list(iter_eval_texts(corpus, split="train"))) == 4
    assert list(iter_eval_texts(corpus, limit=3)) == list(iter_eval_texts(corpus))[:3]


def test_eval_texts_of_some_sources(tmp_path):
    rows = [
        {"text": "an abstract", "source": "abstracts"},
        {"text": "a paper", "source": "papers"},
        {"text": "news", "source": "replay"},
        {"text": "unlabelled"},
    ]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert list(iter_eval_texts(tmp_path / "mixed.jsonl", sources=["papers", "replay"])) == ["a paper", "news"]
    assert list(iter_eval_texts(tmp_path / "mixed.jsonl", sources=["abstracts"], limit=5)) == ["an abstract"]
    (tmp_path / "plain.txt").write_text("text")
    with pytest.raises(ConfigError, match="a text file has none"):
        iter_eval_texts(tmp_path / "plain.txt", sources=["papers"])


def test_eval_text_errors_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "field.jsonl").write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    (tmp_path / "list.jsonl").write_text('["text"]\n')
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-20])
    (tmp_path / "data.csv").write_text("text\n")
    cases = [
        ("bad.jsonl", r"bad.jsonl:2: invalid JSON"),
        ("field.jsonl", r"field.jsonl:3: no string field 'text' \(fields: body\)"),
        ("list.jsonl", r"list.jsonl:1: no string field 'text' \(a JSON list\)"),
        ("bad.txt", r"bad.txt:2: not UTF-8"),
        ("cut.jsonl.gz", r"cut.jsonl.gz:\d+: unreadable"),
    ]
    for name, message in cases:
        with pytest.raises(InputError, match=message):
            list(iter_eval_texts(tmp_path / name))
    with pytest.raises(InputError, match="expected a corpus directory"):
        iter_eval_texts(tmp_path / "data.csv")
    with pytest.raises(InputError, match="not found"):
        iter_eval_texts(tmp_path / "absent.jsonl")
    with pytest.raises(InputError, match="no manifest.json"):
        iter_eval_texts(tmp_path)
    with pytest.raises(ConfigError, match="limit"):
        iter_eval_texts(tmp_path / "bad.jsonl", limit=0)


# -- metrics -----------------------------------------------------------------------------------


def test_result_metrics():
    result = PerplexityResult(documents=2, tokens=10, words=4, bytes=20, nll=8.0)
    assert result.token_perplexity == pytest.approx(math.exp(0.8))
    assert result.word_perplexity == pytest.approx(math.exp(2.0))
    assert result.byte_perplexity == pytest.approx(math.exp(0.4))
    assert result.bits_per_byte == pytest.approx(0.4 / math.log(2))
    assert result.to_dict() == {
        "documents": 2,
        "tokens": 10,
        "words": 4,
        "bytes": 20,
        "nll": 8.0,
        "token_perplexity": result.token_perplexity,
        "word_perplexity": result.word_perplexity,
        "byte_perplexity": result.byte_perplexity,
        "bits_per_byte": result.bits_per_byte,
    }
    assert PerplexityResult(tokens=1, nll=1e6).token_perplexity == math.inf
    assert PerplexityResult().to_dict()["token_perplexity"] is None
