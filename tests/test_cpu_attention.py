"""A bf16 model's decode steps attend in fp32 on a CPU (torch's CPU attention is several times slower in bf16 for
one query per row); its prefill keeps bf16, an fp32 model is untouched, and the model's attention is ``sdpa``
again after every step, a failed one included. That bf16 decoding stays right is
``test_serve_engine::test_bf16_engine_agrees_with_fp32_token_by_token``."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from medfoundry.generation import cpu_attention
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from test_serve_engine import gpt2_dir  # noqa: F401  (session fixture: the tiny GPT-2 checkpoint)


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, torch.dtype]]:
    """Each attention call of a forward: which function (``sdpa`` or the upcast) and the query's dtype there."""
    seen = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def plain(module, query, *args, **kwargs):
        seen.append(("sdpa", query.dtype))
        return sdpa(module, query, *args, **kwargs)

    def inner(module, query, *args, **kwargs):  # what upcast_sdpa calls, on its fp32 copies
        seen.append(("upcast", query.dtype))
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", plain)
    monkeypatch.setattr(cpu_attention, "sdpa_attention_forward", inner)
    return seen


def test_bf16_decode_steps_attend_in_fp32_prefill_in_bf16(gpt2_dir, calls):
    engine = Engine.load(gpt2_dir, precision="bf16", device="cpu", threads=1, max_batch=2)
    assert engine.upcast_attention and engine.model.config._attn_implementation == "sdpa"
    layers = engine.model.config.num_hidden_layers
    done = engine.generate(["The patient presented with", "Aspirin"], SamplingConfig(max_tokens=3, temperature=0))
    assert [len(c.token_ids) for c in done] == [3, 3]
    assert calls[:layers] == [("sdpa", torch.bfloat16)] * layers  # the prefill of both prompts at once
    assert calls[layers:] == [("upcast", torch.float32)] * (2 * layers)  # two decode steps
    assert engine.model.config._attn_implementation == "sdpa"


def test_fp32_model_a_switched_model_and_a_failed_step(gpt2_dir, calls, monkeypatch):
    fp32 = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2)
    assert not fp32.upcast_attention
    fp32.generate(["Aspirin"], SamplingConfig(max_tokens=2, temperature=0))
    assert {kind for kind, _ in calls} == {"sdpa"}

    bf16 = Engine.load(gpt2_dir, precision="bf16", device="cpu", threads=1, max_batch=2)
    bf16.model.set_attn_implementation("eager")  # switched by another user of the model (eval's scoring): kept
    bf16.generate(["Aspirin"], SamplingConfig(max_tokens=2, temperature=0))
    assert {kind for kind, _ in calls} == {"sdpa"} and bf16.model.config._attn_implementation == "eager"
    bf16.model.set_attn_implementation("sdpa")

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    bf16.add_request("Aspirin", SamplingConfig(max_tokens=4, temperature=0))
    bf16.step()  # the prefill and the first decode step
    monkeypatch.setattr(cpu_attention, "sdpa_attention_forward", fail)
    with pytest.raises(RuntimeError, match="boom"):
        bf16.step()
    assert bf16.model.config._attn_implementation == "sdpa"
