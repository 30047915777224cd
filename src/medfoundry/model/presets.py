"""Named model shapes (GPT-2, LLaMA, BLOOM) as ``transformers`` configs, parameter counts and FLOPs per token.

A spec is a preset name or the path of any Hugging Face causal-LM ``config.json`` (or its directory).
Parameter counts use a model built on the meta device, so even the 7B presets cost no memory.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import torch

from medfoundry.errors import ConfigError

_NO_IDS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # set from the tokenizer at export
_LLAMA_7B = {
    "vocab_size": 32_000,
    "hidden_size": 4096,
    "intermediate_size": 11_008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# (model type, config fields); special-token ids are always given: the class defaults may not fit the vocabulary
PRESETS: dict[str, tuple[str, dict]] = {
    # BioMedLM (PubMedGPT 2.7B), with its own 28,896-token tokenizer
    "biomedlm": (
        "gpt2",
        {"vocab_size": 28_896, "n_positions": 1024, "n_embd": 2560, "n_layer": 32, "n_head": 20, **_NO_IDS},
    ),
    "gpt2-small": (
        "gpt2",
        {
            "vocab_size": 50_257,
            "n_positions": 1024,
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "bos_token_id": 50_256,
            "eos_token_id": 50_256,
        },
    ),
    # CPU benchmark sizes with BioMedLM's vocabulary: 12.2M and 52.8M parameters (tied embeddings counted once)
    "gpt2-12m": (
        "gpt2",
        {"vocab_size": 28_896, "n_positions": 256, "n_embd": 256, "n_layer": 6, "n_head": 4, **_NO_IDS},
    ),
    "gpt2-52m": (
        "gpt2",
        {"vocab_size": 28_896, "n_positions": 256, "n_embd": 512, "n_layer": 12, "n_head": 8, **_NO_IDS},
    ),
    "gpt2-tiny": (
        "gpt2",
        {"vocab_size": 4096, "n_positions": 256, "n_embd": 128, "n_layer": 2, "n_head": 4, **_NO_IDS},
    ),
    "llama-7b": ("llama", {**_LLAMA_7B, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}),
    "llama2-7b": ("llama", {**_LLAMA_7B, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}),
    # SmolLM2-135M(-Instruct): the values of the GGUF's metadata (llama.context_length 8192, rope.freq_base 1e5)
    "smollm2-135m": (
        "llama",
        {
            "vocab_size": 49_152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100_000.0},
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
    ),
    # a LLaMA-shaped 0.6B model (head dim 128, grouped-query attention) for scale tests on one machine:
    # big enough that sharding, not the Python runtime, decides each process's memory
    "llama-600m": (
        "llama",
        {
            "vocab_size": 32_000,
            "hidden_size": 1536,
            "intermediate_size": 4096,
            "num_hidden_layers": 20,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            **_NO_IDS,
        },
    ),
    "llama-tiny": (
        "llama",
        {
            "vocab_size": 4096,
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
            **_NO_IDS,
        },
    ),
    # BLOOM uses ALiBi: no position table, the context (2048 for BLOOM) is only recorded, in seq_length
    "bloom-560m": (
        "bloom",
        {
            "vocab_size": 250_880,
            "hidden_size": 1024,
            "n_layer": 24,
            "n_head": 16,
            "seq_length": 2048,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
        },
    ),
    "bloom-tiny": (
        "bloom",
        {"vocab_size": 4096, "hidden_size": 128, "n_layer": 2, "n_head": 4, "seq_length": 256, **_NO_IDS},
    ),
}


def model_config(
    spec: str, *, vocab_size: int | None = None, context: int | None = None, overrides: dict | None = None
):
    """The config of a preset or of a ``config.json`` (file or directory), resized and overridden.

    ``context`` sets the position table (GPT-2 ``n_positions``, LLaMA ``max_position_embeddings``);
    models without one (BLOOM) only record it as ``seq_length``. ``overrides`` come last, so they can
    still set, say, a vocabulary padded beyond the tokenizer's or a longer position table. Special-token
    ids that fall outside the vocabulary are dropped (the tokenizer's are set at export).
    """
    from transformers import CONFIG_MAPPING

    model_type, values = _spec_values(spec)
    config_class = CONFIG_MAPPING[model_type]
    overrides = dict(overrides or {})
    _check_overrides(config_class, overrides)
    sizes = {"vocab_size": vocab_size, _context_field(config_class): context}
    values = {
        **values,
        **{k: v for k, v in sizes.items() if v is not None},
        **{config_class.attribute_map.get(k, k): v for k, v in overrides.items()},
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(values.get(key), int) and values[key] >= values["vocab_size"]:
            values[key] = None
    return config_class(**values)


def _spec_values(spec: str) -> tuple[str, dict]:
    """(model type, config fields) of a preset or of a config.json."""
    from transformers import AutoConfig

    if spec in PRESETS:
        return PRESETS[spec]
    values = AutoConfig.from_pretrained(
        str(_config_path(spec)), local_files_only=True, trust_remote_code=False
    ).to_dict()
    return values.pop("model_type"), values


def _config_path(spec: str) -> Path:
    path = Path(spec)
    if path.is_file() or (path / "config.json").is_file():
        return path
    close = difflib.get_close_matches(spec, PRESETS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"model {spec!r}: not a preset nor a config.json file or directory; {hint}"
        f"presets: {', '.join(PRESETS)} (or give the path of a Hugging Face config.json or of its directory)"
    )


def _check_overrides(config_class, overrides: dict) -> None:
    """Configs accept any keyword silently: reject names the config class does not define (typos)."""
    known = (set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}) | set(
        config_class.attribute_map
    )
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid fields: {', '.join(sorted(known))}"
            raise ConfigError(f"model override {key!r}: {config_class.__name__} has no such field; {hint}")


def _context_field(config_class) -> str:
    """The position table's field (``n_positions`` for GPT-2), or ``seq_length`` for models without one."""
    name = config_class.attribute_map.get("max_position_embeddings", "max_position_embeddings")
    return name if name in inspect.signature(config_class.__init__).parameters else "seq_length"


def context_length(config) -> int | None:
    """The context a config was made for: its position table's size, or the recorded ``seq_length``."""
    return getattr(config, _context_field(type(config)), None)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config) -> int:
    """Trainable parameters, a tied embedding/output matrix counted once."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def flops_per_token(config, context: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM estimate (Chowdhery et al. 2022, appendix B).

    ``6 N + 12 L H T``: ``N`` counts the weights that take part in a matrix product for every token,
    that is all parameters except the embedding lookup tables (token and position), but with the
    output projection (vocab x hidden) even when it is tied to the token embeddings, because its matmul
    is done for every token (with a 28,896-token vocabulary it is 60% of gpt2-12m's compute).
    ``12 L H T`` is the attention scores and weighted sum (``L`` layers, ``H`` hidden size, ``T`` context).
    """
    model = _meta_model(config)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matmul = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in lookups:
        matmul += head.weight.numel()
    return 6.0 * matmul + 12.0 * config.num_hidden_layers * config.hidden_size * context
