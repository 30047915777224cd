"""Packing and masking: packed logits equal each example run alone (GPT-2 and LLaMA, eager and sdpa), the
loss depends only on response predictions, truncation never cuts a response, best-fit packing is
deterministic and full."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from medfoundry.sft.batch import IGNORE, block_causal_mask, collate, masked_token_loss, model_inputs, target_count
from medfoundry.sft.config import TemplateConfig
from medfoundry.sft.formats import read_conversations
from medfoundry.sft.packing import DROPPED, KEPT, TRUNCATED, fit_length, pack
from medfoundry.sft.templates import Renderer, prepare_tokenizer
from test_sft_templates import make_tokenizer

SFT = FIXTURES / "sft"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Real rendered examples (ChatML, masks) and the tokenizer they were made with."""
    root = tmp_path_factory.mktemp("packing")
    cfg = TemplateConfig(name="chatml")
    tokenizer, _ = prepare_tokenizer(str(make_tokenizer(root / "base")), cfg, root / "tok")
    renderer = Renderer(tokenizer, cfg)
    records = [
        c for name in ("alpaca.jsonl", "messages.json", "sharegpt.jsonl") for c in read_conversations(SFT / name)
    ]
    examples = [renderer(c) for c in records]
    return [(e.ids, e.loss) for e in examples], tokenizer


def tiny_model(kind: str, attention: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = attention
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_logits_equal_each_example_alone(rendered, kind, attention):
    examples, tokenizer = rendered
    model = tiny_model(kind, attention, len(tokenizer))
    rows = [examples[0:3], examples[3:4]]  # three examples in one row; one padded row
    batch = collate(rows, tokenizer.pad_token_id or 0, packed=True)
    assert batch["attention_mask"].shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        for r, row in enumerate(rows):
            start = 0
            for ids, _ in row:
                alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
                torch.testing.assert_close(packed[r, start : start + len(ids)], alone, atol=1e-5, rtol=0)
                start += len(ids)
    # and the summed loss of the packed batch is the sum of the examples' losses
    loss = masked_token_loss(packed, batch["labels"])
    alone = [collate([[e]], 0, packed=False) for row in rows for e in row]
    singles = [masked_token_loss(model(**model_inputs(b)).logits, b["labels"]) for b in alone]
    assert target_count(batch) == sum(target_count(b) for b in alone) == batch["target_index"].numel()
    assert loss.item() == pytest.approx(sum(single.item() for single in singles), rel=1e-5)


def test_without_the_block_mask_packing_would_leak_across_examples(rendered):
    """The check above can fail: with a plain causal mask the second example sees the first."""
    examples, tokenizer = rendered
    model = tiny_model("llama", "sdpa", len(tokenizer))
    batch = collate([examples[0:2]], 0, packed=True)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=torch.as_tensor(examples[1][0])[None]).logits[0]
    first = len(examples[0][0])
    assert (leaky[0, first:] - alone).abs().max() > 1e-3


def test_labels_are_the_responses_and_never_cross_an_example_boundary(rendered):
    examples, tokenizer = rendered
    batch = collate([examples[3:6]], 0, packed=True)
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    expected = np.concatenate([np.where(loss, e, IGNORE) for e, loss in examples[3:6]])
    starts = np.cumsum([0] + [len(e) for e, _ in examples[3:6]])[:-1]
    expected[starts] = IGNORE  # nothing in the row predicts an example's first token
    assert labels.tolist() == expected.tolist()
    assert batch["position_ids"][0].tolist() == [p for e, _ in examples[3:6] for p in range(len(e))]
    text = tokenizer.decode(ids[labels != IGNORE].tolist())
    assert (
        text == "Average blood glucose over about three months.<|im_end|>B. Vitamin C<|im_end|>"
        "Vitamin D deficiency.<|im_end|>Yes.<|im_end|>"
    )


def test_loss_depends_only_on_response_predictions(rendered):
    """Gradients reach exactly the positions that predict a response token; relabelling a prompt token
    (a masked target) leaves the loss unchanged, relabelling a response token changes it."""
    examples, tokenizer = rendered
    model = tiny_model("gpt2", "eager", len(tokenizer))
    row = [examples[4], examples[6]]
    batch = collate([row], 0, packed=True)
    logits = model(**model_inputs(batch)).logits.detach().requires_grad_()
    loss = masked_token_loss(logits, batch["labels"])
    loss.backward()
    predicts_response = (batch["labels"][0, 1:] != IGNORE).numpy()
    touched = (logits.grad[0, :-1].abs().sum(-1) > 0).numpy()
    assert (touched == predicts_response).all() and predicts_response.sum() > 10
    assert logits.grad[0, -1].abs().sum() == 0

    def relabelled(example_index: int, want_loss: bool) -> float:
        changed = [(ids.copy(), loss) for ids, loss in row]
        ids, mask = changed[example_index]
        position = int(np.flatnonzero(mask == want_loss)[1])
        ids[position] = (ids[position] + 1) % len(tokenizer)
        with torch.no_grad():
            return masked_token_loss(logits, collate([changed], 0, packed=True)["labels"]).item()

    for example_index in (0, 1):
        assert relabelled(example_index, want_loss=False) == loss.item()  # a prompt token: masked
        assert relabelled(example_index, want_loss=True) != loss.item()  # a response token: trained


def test_block_causal_mask_layout():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = block_causal_mask(segments, torch.bool)[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]  # padding attends to itself only: no empty softmax row
    additive = block_causal_mask(segments, torch.float32)
    assert ((additive == 0) == block_causal_mask(segments, torch.bool)).all()
    assert additive.min() == torch.finfo(torch.float32).min


def test_unpacked_batches_pad_each_row_and_use_a_2d_mask(rendered):
    examples, _ = rendered
    batch = collate([[examples[0]], [examples[1]]], 7, packed=False)
    short, long_ = sorted((len(examples[0][0]), len(examples[1][0])))
    assert batch["attention_mask"].shape == (2, long_) and int(batch["attention_mask"].sum()) == short + long_
    padded_row = int(np.argmin([len(examples[0][0]), len(examples[1][0])]))
    assert (batch["input_ids"][padded_row, short:] == 7).all() and (batch["labels"][padded_row, short:] == IGNORE).all()


def test_truncation_cuts_prompts_from_the_left_and_never_a_response():
    ids = np.arange(10)
    loss = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    assert fit_length(ids, loss, 10, "error")[2] == KEPT
    cut_ids, cut_loss, status = fit_length(ids, loss, 7, "left_prompt")
    assert status == TRUNCATED and cut_ids.tolist() == [3, 4, 5, 6, 7, 8, 9] and cut_loss.sum() == 4
    # the first response token needs a token before it to be predicted: 4 would leave none
    assert fit_length(ids, loss, 5, "left_prompt")[0].tolist() == [5, 6, 7, 8, 9]
    assert fit_length(ids, loss, 4, "left_prompt")[2] == DROPPED
    assert fit_length(ids, loss, 9, "drop")[2] == DROPPED and fit_length(ids, loss, 9, "error")[2] == DROPPED


def test_best_fit_packing_is_deterministic_complete_and_full():
    lengths = np.random.default_rng(0).integers(20, 300, size=2000)
    rows = pack(lengths, 1024, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(2000))
    assert max(lengths[row].sum() for row in rows) <= 1024
    assert lengths.sum() / (len(rows) * 1024) > 0.97
    assert rows == pack(lengths, 1024, seed=3) and rows != pack(lengths, 1024, seed=4)
