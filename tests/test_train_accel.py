"""Run-time speed-ups of the training model: attention kernel, native GELU, the output layer left to the loss.
None may change what the model computes, its weights or the config.json it exports."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medfoundry.errors import ConfigError
from medfoundry.model.presets import model_config
from medfoundry.train.accel import (
    HiddenStatesLM,
    TanhGELU,
    _tanh_gelu_classes,
    attention_for,
    fused_head,
    native_gelu,
    set_attention,
)


def tiny(preset: str, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(preset, vocab_size=96, context=32, overrides=overrides)).eval()


def test_attention_rule():
    assert attention_for("auto", "cpu", 128) == attention_for("auto", "cpu", 511) == "eager"
    assert attention_for("auto", "cpu", 512) == "sdpa" and attention_for("auto", "cuda:0", 256) == "sdpa"
    assert attention_for("sdpa", "cpu", 256) == "sdpa" and attention_for("eager", "cuda", 4096) == "eager"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_attention_switch_keeps_outputs_and_a_clean_config(preset, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(preset)
    ids = torch.randint(0, 96, (2, 16))
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert set_attention(model, "auto", "cpu", 32) == "eager"
        after = model(input_ids=ids).logits
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_bloom_keeps_its_own_attention():
    model = tiny("bloom-tiny")
    assert set_attention(model, "auto", "cpu", 32) == "eager" == set_attention(model, "eager", "cpu", 32)
    with pytest.raises(ConfigError, match="training.attention: BloomForCausalLM has only its own 'eager'"):
        set_attention(model, "sdpa", "cpu", 32)


def _tanh_gelus() -> list[nn.Module]:
    """Every module native_gelu replaces, GELUTanh in its Python variant too."""
    from transformers.activations import GELUTanh

    return [cls() for cls in _tanh_gelu_classes()] + [GELUTanh(use_gelu_tanh_python=True)]


@pytest.mark.parametrize("module", _tanh_gelus(), ids=lambda m: type(m).__name__)
def test_native_gelu_is_the_same_function(module):
    x = (torch.randn(4096, dtype=torch.float64) * 4).float().requires_grad_()
    y = x.detach().clone().requires_grad_()
    expected, got = module(x), TanhGELU()(y)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)  # BLOOM rounds sqrt(2/pi) to 0.79788456
    expected.backward(torch.ones_like(expected))
    got.backward(torch.ones_like(got))
    torch.testing.assert_close(y.grad, x.grad, atol=2e-6, rtol=1e-5)
    xb = x.detach().bfloat16()
    torch.testing.assert_close(TanhGELU()(xb).float(), module(xb).float(), atol=0.02, rtol=0.016)  # bf16 rounding


def test_compiled_tanh_gelu_is_the_same_function():
    """Compiled, TanhGELU takes its sigmoid form (cheaper for Inductor): the eager kernel's values and gradients
    to fp32 rounding, and to bf16 rounding in bf16; the graph dynamo hands the compiler holds the sigmoid, not
    the GELU kernel."""
    torch._dynamo.reset()
    traced = []

    def capture(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch.compile(TanhGELU(), backend=capture)(torch.randn(8))
    assert any("sigmoid" in target for target in traced) and not any("gelu" in target for target in traced)
    x = (torch.randn(4096, dtype=torch.float64) * 4).float().requires_grad_()
    y = x.detach().clone().requires_grad_()
    eager, compiled = TanhGELU()(x), torch.compile(TanhGELU())(y)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    eager.backward(torch.ones_like(eager))
    compiled.backward(torch.ones_like(compiled))
    torch.testing.assert_close(y.grad, x.grad, atol=1e-5, rtol=1e-5)
    xb = x.detach().bfloat16()
    torch.testing.assert_close(torch.compile(TanhGELU())(xb).float(), TanhGELU()(xb).float(), atol=0.02, rtol=0.016)


@pytest.mark.parametrize("preset, count", [("gpt2-tiny", 2), ("bloom-tiny", 2), ("llama-tiny", 0)])
def test_native_gelu_in_models(preset, count, tmp_path):
    model = tiny(preset, **({"activation_function": "gelu_new"} if preset.startswith("gpt2") else {}))
    ids = torch.randint(0, 96, (2, 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert native_gelu(model) == count
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert model.state_dict().keys() == state.keys() and all(
        torch.equal(v, state[k]) for k, v in model.state_dict().items()
    )
    if count:
        assert sum(isinstance(m, TanhGELU) for m in model.modules()) == count
        model.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text()).get("activation_function", "gelu_new") == "gelu_new"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bloom-tiny"])
def test_hidden_states_wrapper_leaves_the_output_layer_to_the_loss(preset):
    model = tiny(preset)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        names = list(model.state_dict())
        head = fused_head(model, "auto")
        hidden = HiddenStatesLM(model)(input_ids=ids)
        again = model(input_ids=ids).logits  # the model itself still returns logits
    assert type(head) is nn.Linear and head is model.get_output_embeddings()
    assert hidden.shape == (2, 16, model.config.hidden_size) and list(model.state_dict()) == names
    torch.testing.assert_close(hidden @ head.weight.T, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, logits)
    assert fused_head(tiny(preset), "plain") is None


def test_chunked_loss_refused_where_it_does_not_fit():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    assert fused_head(model, "auto") is None  # auto: the plain loss
    with pytest.raises(ConfigError, match="training.loss: chunked does not fit this model: model type 'gpt_neox'"):
        fused_head(model, "chunked")
    biased = tiny("llama-tiny")
    biased.lm_head = nn.Linear(128, 96)
    with pytest.raises(ConfigError, match="output layer has a bias"):
        fused_head(biased, "chunked")
