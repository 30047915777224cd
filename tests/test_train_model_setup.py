"""train/model_setup.py: a GGUF ``init_from`` goes through the one hash-keyed cache (a changed file is
converted again, never a stale copy beside the run), and one preparation for pretraining, fine-tuning
and the planner leaves the Hugging Face model returning logits."""

from __future__ import annotations

import os
import time

import pytest
import torch

from medfoundry.model.presets import model_config
from medfoundry.train.accel import HiddenStatesLM
from medfoundry.train.config import TrainingConfig
from medfoundry.train.model_setup import load_pretrained, prepare_for_training


def tiny(seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config("gpt2-tiny", vocab_size=96, context=32))


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Each conversion writes a tiny GPT-2 whose seed is the GGUF file's first byte."""
    monkeypatch.setenv("MEDFOUNDRY_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf_path, out):
        calls.append(gguf_path)
        tiny(gguf_path.read_bytes()[0]).save_pretrained(out)

    monkeypatch.setattr("medfoundry.model.convert.convert_gguf", convert)
    return calls


def test_a_changed_gguf_init_from_is_not_ignored(tmp_path, fake_convert):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes([1]))
    first = load_pretrained(str(gguf))
    assert load_pretrained(str(gguf)).state_dict().keys() == first.state_dict().keys() and len(fake_convert) == 1
    gguf.write_bytes(bytes([2]))
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = load_pretrained(str(gguf))
    assert len(fake_convert) == 2
    assert torch.equal(second.transformer.wte.weight, tiny(2).transformer.wte.weight)
    assert not torch.equal(second.transformer.wte.weight, first.transformer.wte.weight)


@pytest.mark.parametrize("loss", ["chunked", "plain"])
def test_prepared_model_keeps_returning_logits(loss):
    model = tiny().eval()  # no dropout
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    training = TrainingConfig(steps=1, loss=loss, attention="eager", activation_checkpointing=True)
    prepared = prepare_for_training(model, training, device="cpu", context=32)
    assert prepared.lm is model and prepared.kernels == {"attention": "eager", "loss": loss}
    assert isinstance(prepared.model, HiddenStatesLM) == (loss == "chunked")
    assert (prepared.head is model.get_output_embeddings()) == (loss == "chunked")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        if loss == "chunked":
            hidden = prepared.model(input_ids=ids)
            torch.testing.assert_close(hidden @ prepared.head.weight.T, expected, atol=1e-5, rtol=1e-5)
