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
    assert prepared.lm is model and prepared.kernels == {"attention": "eager", "loss": loss, "compile": "off"}
    assert isinstance(prepared.model, HiddenStatesLM) == (loss == "chunked")
    assert (prepared.head is model.get_output_embeddings()) == (loss == "chunked")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        if loss == "chunked":
            hidden = prepared.model(input_ids=ids)
            torch.testing.assert_close(hidden @ prepared.head.weight.T, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_a_meta_model_filled_from_safetensors_equals_the_loaded_and_grown_model(tmp_path, preset):
    """The FSDP2 path, in one process: a model built on the meta device, materialized and filled from a
    checkpoint's safetensors (rows read by slices), equals the checkpoint loaded whole; rows of a grown
    vocabulary are the mean of the checkpoint's rows, as grow_embeddings makes them; non-persistent
    buffers (LLaMA's rotary frequencies) are computed, not left empty."""
    from transformers import AutoModelForCausalLM

    from medfoundry.model.resize import grow_embeddings
    from medfoundry.train import distributed
    from medfoundry.train.materialize import materialize, meta_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(model_config(preset, vocab_size=96, context=32))
    base.save_pretrained(tmp_path / "base")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    grow_embeddings(expected, 100)

    model = meta_model(expected.config.__class__.from_pretrained(tmp_path / "base"))
    grow_embeddings(model, 100)  # on the meta device: shapes only
    materialize(model, "cpu", source=tmp_path / "base", seed=0, d=distributed.Dist())
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert dict(model.named_buffers()).keys() == dict(expected.named_buffers()).keys()
    for name, buffer in expected.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    ids = torch.tensor([[1, 5, 99, 7]])
    with torch.no_grad():
        got, want = model.eval()(input_ids=ids).logits, expected.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_meta_model_from_scratch_is_initialized_per_process(tmp_path):
    """From scratch, each process's shards are initialized with the architecture's own rules from a
    seed of its own (different processes, different values; the global RNG state untouched)."""
    from medfoundry.train import distributed
    from medfoundry.train.materialize import materialize, meta_model

    config = model_config("llama-tiny", vocab_size=96, context=32)
    made = []
    for rank in (0, 1):
        model = meta_model(config)
        state = torch.get_rng_state()
        materialize(model, "cpu", source=None, seed=3, d=distributed.Dist(rank=rank, world_size=2))
        assert torch.equal(torch.get_rng_state(), state)
        made.append(model.state_dict())
    weight = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(made[0][weight], made[1][weight])
    assert 0.015 < made[0][weight].std() < 0.025  # the config's initializer_range (0.02)
    assert torch.equal(made[0]["model.norm.weight"], torch.ones(128))
