"""Checkpoints written by ``export_hf`` (tiny GPT-2, LLaMA and BLOOM) checked against what ``vllm serve DIR`` reads.

vLLM needs a CUDA (or ROCm/TPU) build and cannot run here; its PyPI wheel is a ~340 MB GPU build, so the rules
below are taken from its source instead, vllm==0.33.0, and each constant names the file it comes from. The
architecture list matches vLLM's documentation ("Supported Models", Text Generation:
https://docs.vllm.ai/en/latest/models/supported_models.html).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from conftest import shared
from medfoundry.model.export import export_hf
from medfoundry.model.presets import PRESETS, context_length, model_config

# vllm/model_executor/models/registry.py, _TEXT_GENERATION_MODELS: architecture -> (vLLM module, class), for the
# model families of medfoundry's presets (a preset of another family must first be found in that table)
VLLM_ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
}
# vllm/transformers_utils/model_arch_config_convertor.py, derive_max_model_len_and_key: the context is the
# smallest of these config fields (model_max_length, when set, wins), then vllm/config/model.py
# _get_and_verify_max_len caps it at tokenizer_config.json's model_max_length; with none of them, 2048
VLLM_MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# vllm/config/model.py, get_diff_sampling_param: the generation_config.json fields that become default sampling
# parameters (--generation-config auto, the default); max_new_tokens becomes max_tokens
VLLM_SAMPLING_DEFAULTS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
    "skip_special_tokens",
)
# vllm/config/model.py, _STR_DTYPE_TO_TORCH_DTYPE (the values of --dtype other than auto)
VLLM_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

CONTEXT = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (preset, exported dtype, chat template in the tokenizer): tied and untied embeddings, every dtype, with and without
CASES = [("gpt2-tiny", "bfloat16", False), ("llama-tiny", "float32", True), ("bloom-tiny", "float16", False)]


def gpt2_tokenizer(directory: Path, *, chat_template: bool, **tokenizer_config) -> Path:
    """GPT-2's tokenizer files, optionally with a chat template and a tokenizer_config.json."""
    shutil.copytree(shared("tokenizers/gpt2"), directory)
    if chat_template:
        (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if tokenizer_config:
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>",
                    **tokenizer_config,
                }
            )
        )
    return directory


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def exported(request, tmp_path_factory):
    """(exported directory, the live model, the tokenizer directory it was exported with)."""
    preset, dtype, chat = request.param
    root = tmp_path_factory.mktemp(preset)
    tokenizer_dir = gpt2_tokenizer(root / "tokenizer", chat_template=chat)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(preset, vocab_size=50_257, context=CONTEXT)).eval()
    out = export_hf(model, tokenizer_dir, root / "model", dtype=dtype, generation={"max_new_tokens": 64})
    return out, model, tokenizer_dir


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def vllm_max_model_len(directory: Path) -> float:
    """The context vLLM derives for a checkpoint (infinite when it would fall back to its 2048 default)."""
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    found = [getattr(config, key) for key in VLLM_MAX_LEN_KEYS if getattr(config, key, None) is not None]
    derived = getattr(config, "model_max_length", None) or min(found, default=math.inf)
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        derived = min(derived, read_json(tokenizer_config).get("model_max_length", derived))
    return derived


def test_architecture_is_one_vllm_implements(exported):
    out, model, _ = exported
    config = read_json(out / "config.json")
    assert config["architectures"] == [type(model).__name__]
    assert config["architectures"][0] in VLLM_ARCHITECTURES
    assert config["model_type"] == VLLM_ARCHITECTURES[config["architectures"][0]][0]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_an_architecture_vllm_implements(preset):
    """What ``medfoundry pretrain`` can build, vLLM can serve: every preset's causal-LM class is in vLLM's table."""
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_config(preset).model_type] in VLLM_ARCHITECTURES


def test_no_remote_code_needed(exported):
    out, _, _ = exported
    assert not list(out.glob("*.py"))
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert "auto_map" not in read_json(out / name), name
    AutoConfig.from_pretrained(out, trust_remote_code=False, local_files_only=True)  # a class transformers ships


def test_dtype_is_the_weights_dtype(exported):
    """vLLM reads ``dtype`` (``torch_dtype`` before transformers 4.56); --dtype auto serves float32 as bfloat16."""
    out, _, _ = exported
    config = read_json(out / "config.json")
    assert config["dtype"] in VLLM_DTYPES
    assert config.get("torch_dtype", config["dtype"]) == config["dtype"]
    with safe_open(out / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {VLLM_DTYPES[config["dtype"]]}


def test_vllm_derives_the_models_context(exported):
    out, model, _ = exported
    assert context_length(model.config) == CONTEXT
    assert vllm_max_model_len(out) == CONTEXT  # not vLLM's 2048 fallback, nor a tokenizer's smaller limit


def test_tokenizer_limit_does_not_cap_the_context(tmp_path):
    """vLLM caps the context at tokenizer_config.json's model_max_length, which ``medfoundry tokenizer train``
    records (1024 by default): the exported checkpoint must keep the model's own context."""
    tokenizer_dir = gpt2_tokenizer(tmp_path / "tokenizer", chat_template=False, model_max_length=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("llama-tiny", vocab_size=50_257, context=2048))
    out = export_hf(model, tokenizer_dir, tmp_path / "model")
    assert vllm_max_model_len(out) == 2048


def test_weights_are_safetensors_that_vllm_maps_onto_the_model(exported):
    """Only safetensors (vLLM prefers them, and never needs to unpickle), every tensor stored once: a tied output
    matrix is absent and ``tie_word_embeddings`` says so (vLLM ties it itself), an untied one is present."""
    out, model, _ = exported
    assert [p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")] == [
        "model.safetensors"
    ]
    config = read_json(out / "config.json")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert config["tie_word_embeddings"] is tied
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        stored = set(weights.keys())
    assert ("lm_head.weight" in stored) is not tied
    expected = {name for name, _ in model.named_parameters()}  # named_parameters lists a shared tensor once
    assert stored == expected
    _, info = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor


def test_tokenizer_loads_offline_and_fits_the_vocabulary(exported):
    out, _, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    vocab_size = read_json(out / "config.json")["vocab_size"]
    assert len(tokenizer) <= vocab_size
    text = "Metformin 500 mg b.i.d.; HbA1c fell to 6.5%."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (out / "tokenizer.json").is_file()  # the fast tokenizer vLLM loads, no sentencepiece conversion


def test_generation_config_ids_and_sampling_defaults(exported):
    out, _, _ = exported
    generation = GenerationConfig.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    vocab_size = read_json(out / "config.json")["vocab_size"]
    assert generation.eos_token_id == tokenizer.eos_token_id < vocab_size
    assert generation.bos_token_id == tokenizer.bos_token_id < vocab_size
    raw = read_json(out / "generation_config.json")
    defaults = {key: raw[key] for key in VLLM_SAMPLING_DEFAULTS if raw.get(key) is not None}
    assert defaults == {"max_new_tokens": 64}  # what vLLM will apply to requests that do not say otherwise


def test_chat_template_travels_with_the_tokenizer(exported):
    """vLLM's chat endpoint uses the tokenizer's template; without one it needs ``--chat-template FILE``."""
    out, _, tokenizer_dir = exported
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    if not (tokenizer_dir / "chat_template.jinja").is_file():
        assert not tokenizer.chat_template
        return
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
