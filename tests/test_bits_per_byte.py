"""Bits per byte has one definition (medfoundry.model.bits_per_byte): pretraining's ``val_bpb`` and the eval
stage's perplexity give the same number on the same token windows, and a predicted special token adds neither
its loss nor its 13 decoded bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import shared
from medfoundry.eval.perplexity import iter_eval_texts, shard_perplexity, text_perplexity
from medfoundry.model.bits_per_byte import bits_per_byte, special_ids, text_bytes
from medfoundry.model.export import export_hf
from medfoundry.model.load import load_tokenizer
from medfoundry.model.presets import model_config
from medfoundry.train.accel import HiddenStatesLM
from medfoundry.train.distributed import Dist
from medfoundry.train.loop import WindowValidation
from medfoundry.train.losses import NextTokenLoss
from test_token_shards import read_abstracts, write_corpus

CONTEXT = 48  # a validation window: [EOS] + a 47-token document + [EOS]

pytestmark = pytest.mark.usefixtures("one_thread")


class EosFirst:
    """Token shards as the trainer's packed stream sees them, with the EOS that precedes every document but
    the first put before the first too: WindowValidation's windows are then ``[EOS] + document + [EOS]``."""

    def __init__(self, shards):
        self.shards, self.total_tokens = shards, shards.total_tokens + 1

    def slice(self, start: int, stop: int) -> np.ndarray:
        tail = self.shards.slice(max(start - 1, 0), stop - 1)
        return np.concatenate(([self.shards.eos_id], tail)) if start == 0 else tail


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, tokenizer, corpus dir, val shards dir): a random tiny GPT-2 with the GPT-2 tokenizer, and six
    real abstracts cut to 47 tokens (cuts that re-encode to the same tokens), tokenized into shards."""
    from medfoundry.tokenizer.shards import tokenize_corpus
    from medfoundry.tokenizer.token_shards import TokenShards

    root = tmp_path_factory.mktemp("bpb")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("gpt2-tiny", vocab_size=50_257, context=64))
    model_dir = export_hf(model, shared("tokenizers/gpt2"), root / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    texts = []
    for abstract in read_abstracts(20):
        ids = tokenizer(abstract, add_special_tokens=False)["input_ids"][: CONTEXT - 1]
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == ids:
            texts.append(text)
    texts = texts[:6]
    assert len(texts) == 6
    write_corpus(root / "corpus", [*texts, *texts], {"train": 1, "val": 1})
    tokenize_corpus(root / "corpus", model_dir, root / "tokens", workers=1)
    shards = TokenShards(root / "tokens" / "val")
    assert [len(shards.document(i)) for i in range(shards.num_docs)] == [CONTEXT - 1] * 6
    return model, tokenizer, root / "corpus", root / "tokens" / "val"


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "chunked"])
def test_val_bpb_equals_the_eval_stage_bits_per_byte(setup, fused):
    from medfoundry.tokenizer.token_shards import TokenShards

    model, tokenizer, corpus, val = setup
    shards = TokenShards(val)
    validation = WindowValidation(EosFirst(shards), CONTEXT, batches=3, micro=2, tokenizer=tokenizer, d=Dist())
    eos = shards.eos_id
    assert len(validation.windows) == 6
    assert all(w[0] == w[-1] == eos and eos not in w[1:-1] for w in validation.windows)

    loss = NextTokenLoss(model.lm_head if fused else None, "fp32", "cpu")
    metrics = validation.run(HiddenStatesLM(model) if fused else model, loss, "cpu", Dist())

    from_shards = shard_perplexity(model, val, max_length=CONTEXT, tokenizer=tokenizer)
    from_texts = text_perplexity(model, tokenizer, iter_eval_texts(corpus), max_length=CONTEXT)
    assert from_shards.bytes == from_texts.bytes == validation.bytes  # the text's bytes, without the EOS
    assert from_shards.bits_per_byte == pytest.approx(from_texts.bits_per_byte, rel=1e-6)
    assert metrics["val_bpb"] == pytest.approx(from_shards.bits_per_byte, rel=1e-5)

    # val_loss keeps every target: the documents' tokens and the EOS that ends each
    assert metrics["val_loss"] * 6 * CONTEXT > from_shards.nll
    # what val_bpb was before: the EOS's loss kept and its 13 decoded bytes counted
    decoded = sum(len(tokenizer.decode(w[1:].tolist()).encode()) for w in validation.windows)
    assert decoded == validation.bytes + 6 * len(tokenizer.eos_token.encode()) == validation.bytes + 78
    old = metrics["val_loss"] * 6 * CONTEXT / math.log(2) / decoded
    assert abs(old / metrics["val_bpb"] - 1) > 0.005


def test_special_tokens_count_no_bytes(setup):
    _, tokenizer, _, _ = setup
    eos = tokenizer.eos_token_id
    assert eos in special_ids(tokenizer)
    ids = tokenizer("Café au lait", add_special_tokens=False)["input_ids"]
    assert text_bytes(tokenizer, [eos, *ids, eos]) == text_bytes(tokenizer, ids) == len("Café au lait".encode())
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0) and bits_per_byte(1.0, 0) is None
