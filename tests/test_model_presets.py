"""Model presets: shapes, parameter counts (on the meta device), overrides, config.json specs, FLOPs."""

from __future__ import annotations

import pytest

from medfoundry.errors import ConfigError
from medfoundry.model.presets import PRESETS, context_length, count_parameters, flops_per_token, model_config

EXPECTED_PARAMETERS = {
    "biomedlm": 2_594_247_680,
    "gpt2-small": 124_439_808,  # GPT-2 small as published
    "gpt2-12m": 12_201_984,
    "gpt2-52m": 52_755_456,
    "gpt2-tiny": 953_856,
    "llama-7b": 6_738_415_616,  # LLaMA-7B as published
    "llama2-7b": 6_738_415_616,
    "smollm2-135m": 134_515_008,
    "llama-600m": 601_683_456,
    "llama-tiny": 1_417_856,
    "bloom-560m": 559_214_592,  # bigscience/bloom-560m
    "bloom-tiny": 921_344,
}


def test_parameter_counts():
    counts = {name: count_parameters(model_config(name)) for name in PRESETS}
    for name, count in counts.items():
        print(f"{name:14s} {count:>15,d} parameters")
    assert counts == EXPECTED_PARAMETERS
    assert 11.5e6 < counts["gpt2-12m"] < 12.5e6 and 50e6 < counts["gpt2-52m"] < 54e6
    assert all(0.5e6 < counts[name] < 1.5e6 for name in ("gpt2-tiny", "llama-tiny", "bloom-tiny"))


def test_published_shapes():
    biomedlm = model_config("biomedlm")
    assert (biomedlm.n_embd, biomedlm.n_head, biomedlm.n_layer, biomedlm.vocab_size, biomedlm.n_positions) == (
        2560,
        20,
        32,
        28_896,
        1024,
    )
    llama, llama2 = model_config("llama-7b"), model_config("llama2-7b")
    assert (llama.max_position_embeddings, llama.rms_norm_eps, llama2.max_position_embeddings, llama2.rms_norm_eps) == (
        2048,
        1e-6,
        4096,
        1e-5,
    )
    assert not llama.tie_word_embeddings and model_config("smollm2-135m").tie_word_embeddings
    assert model_config("bloom-560m").vocab_size == 250_880


@pytest.mark.parametrize(
    "name, key", [("gpt2-tiny", "n_positions"), ("llama-tiny", "max_position_embeddings"), ("bloom-tiny", "seq_length")]
)
def test_vocab_context_and_overrides(name, key):
    config = model_config(name, vocab_size=1000, context=512, overrides={"num_hidden_layers": 3})
    assert config.vocab_size == 1000 and getattr(config, key) == 512 == context_length(config)
    assert config.num_hidden_layers == 3
    assert count_parameters(config) < count_parameters(model_config(name))


def test_overrides_come_last():
    config = model_config(
        "gpt2-tiny", vocab_size=4000, context=128, overrides={"vocab_size": 4032, "max_position_embeddings": 512}
    )
    assert (config.vocab_size, config.n_positions) == (4032, 512)  # a padded vocabulary, a longer position table


def test_special_ids_outside_a_smaller_vocabulary_are_dropped():
    assert model_config("gpt2-small").eos_token_id == 50256
    config = model_config("gpt2-small", vocab_size=28_896)
    assert config.eos_token_id is None and config.bos_token_id is None


def test_config_json_file_or_directory(tmp_path):
    model_config("llama-tiny", overrides={"hidden_size": 64}).save_pretrained(tmp_path)
    for spec in (tmp_path, tmp_path / "config.json"):
        config = model_config(str(spec), vocab_size=300, context=128)
        assert (config.model_type, config.hidden_size, config.vocab_size, config.max_position_embeddings) == (
            "llama",
            64,
            300,
            128,
        )


def test_unknown_preset_lists_presets_and_paths():
    with pytest.raises(ConfigError) as err:
        model_config("gpt2-smal")
    message = str(err.value)
    assert "did you mean 'gpt2-small'" in message and "llama-7b" in message and "config.json" in message


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        model_config("gpt2-tiny", overrides={"n_layers": 4})


def test_flops_per_token():
    gpt2 = model_config("gpt2-tiny")  # tied: the head's matmul counts, the position table does not
    assert flops_per_token(gpt2, 256) == 6 * (953_856 - 256 * 128) + 12 * 2 * 128 * 256
    llama = model_config("llama-tiny")  # untied: the head counts once, the input embedding not at all
    assert flops_per_token(llama, 256) == 6 * (1_417_856 - 4096 * 128) + 12 * 2 * 128 * 256
    assert flops_per_token(llama, 512) > flops_per_token(llama, 256)
