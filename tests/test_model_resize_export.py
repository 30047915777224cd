"""Growing embeddings for an extended tokenizer, and exporting models as Hugging Face directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import shared
from medfoundry.errors import ConfigError, InputError
from medfoundry.model.export import export_hf
from medfoundry.model.presets import model_config
from medfoundry.model.resize import grow_embeddings, resize_for_tokenizer

TEXT = "The patient received 5 mg/kg of 5-fluorouracil; IL-6 levels fell."


def tiny(name: str, **kwargs):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(name, **kwargs)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_grow_embeddings(name):
    model = tiny(name)
    tied = model.config.tie_word_embeddings
    assert tied == (name == "gpt2-tiny")  # LLaMA keeps a separate output matrix
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = torch.randint(0, 4096, (2, 16))
    before = logits(model, ids)

    assert grow_embeddings(model, 4100) == [4096, 4097, 4098, 4099]

    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert model.config.vocab_size == 4100 and new_in.shape == new_out.shape == (4100, 128)
    assert torch.equal(new_in[:4096], old_in) and torch.equal(new_out[:4096], old_out)
    assert torch.allclose(new_in[4096:], old_in.mean(0).expand(4, -1))
    assert torch.allclose(new_out[4096:], old_out.mean(0).expand(4, -1))
    assert (new_out is new_in) == tied
    assert tied or not torch.equal(new_in[4096], new_out[4096])  # untied: each matrix has its own mean
    after = logits(model, ids)
    assert after.shape[-1] == 4100 and torch.allclose(after[..., :4096], before, atol=1e-5)


def test_grow_refuses_to_shrink():
    with pytest.raises(ConfigError, match="cannot shrink"):
        grow_embeddings(tiny("gpt2-tiny"), 4000)


def write_extension(directory, base: int, size: int) -> None:
    directory.mkdir(exist_ok=True)
    record = {"base_vocab_size": base, "vocab_size": size, "added_ids": list(range(base, size))}
    (directory / "vocab_extension.json").write_text(json.dumps(record))


def test_resize_for_an_extended_tokenizer(tmp_path):
    model = tiny("llama-tiny")
    write_extension(tmp_path / "ext", 4096, 4106)
    report = resize_for_tokenizer(model, tmp_path / "ext")
    assert report == {
        "source": "vocab_extension.json",
        "model_vocab_size": 4096,
        "vocab_size": 4106,
        "added_ids": list(range(4096, 4106)),
    }
    assert resize_for_tokenizer(model, tmp_path / "ext")["added_ids"] == []  # already grown (e.g. on resume)

    write_extension(tmp_path / "other", 5000, 5010)
    with pytest.raises(ConfigError, match="not trained with the base tokenizer"):
        resize_for_tokenizer(tiny("llama-tiny"), tmp_path / "other")
    (tmp_path / "other" / "vocab_extension.json").write_text(
        '{"base_vocab_size": 4096, "vocab_size": 4100, "added_ids": [7]}'
    )
    with pytest.raises(InputError, match="appended"):
        resize_for_tokenizer(tiny("llama-tiny"), tmp_path / "other")


def test_resize_for_a_larger_unrelated_tokenizer():
    gpt2 = shared("tokenizers/gpt2")  # 50,257 tokens, no vocab_extension.json
    with pytest.raises(ConfigError, match="not an extension"):
        resize_for_tokenizer(tiny("gpt2-tiny"), gpt2)
    model = tiny("gpt2-tiny")
    assert resize_for_tokenizer(model, gpt2, grow=True)["vocab_size"] == 50_257 == model.config.vocab_size
    padded = tiny("gpt2-tiny", vocab_size=50_304)  # a model larger than its tokenizer is left alone
    assert resize_for_tokenizer(padded, gpt2)["added_ids"] == [] and padded.config.vocab_size == 50_304


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bloom-tiny"])
def test_export_loads_back_identically(name, tmp_path):
    model = tiny(name, vocab_size=50_257)
    out = export_hf(
        torch.compile(model), shared("tokenizers/gpt2"), tmp_path / "model", generation={"max_new_tokens": 32}
    )

    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == TEXT
    assert type(loaded) is type(model) and torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.config.eos_token_id == loaded.generation_config.eos_token_id == tokenizer.eos_token_id == 50_256
    assert loaded.generation_config.max_new_tokens == 32


def test_export_bfloat16_leaves_the_fp32_model_alone(tmp_path):
    model = tiny("gpt2-tiny", vocab_size=50_257)
    out = export_hf(model, shared("tokenizers/gpt2"), tmp_path / "bf16", dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = weights.keys()  # safe_open is neither iterable nor a container
        assert {weights.get_slice(k).get_dtype() for k in names} == {"BF16"}
        assert "lm_head.weight" not in names  # tied to the token embeddings: stored once
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_export_copies_tokenizer_config_and_chat_template(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        [TEXT] * 20,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    src = tmp_path / "tokenizer"
    src.mkdir()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>",
                "pad_token": "<|pad|>",
            }
        )
    )
    (src / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )

    out = export_hf(tiny("llama-tiny", vocab_size=tok.get_vocab_size()), src, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>hi<|im_end|>"
    )
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (0, 1)


def test_export_without_tokenizer(tmp_path):
    model = tiny("bloom-tiny")
    out = export_hf(model, None, tmp_path / "model")
    assert not (out / "tokenizer.json").exists()
    ids = torch.randint(0, 4096, (1, 8))
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(out, local_files_only=True), ids), logits(model, ids)
    )
