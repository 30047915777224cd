"""Write a LLaMA-family Hugging Face checkpoint as one GGUF file that llama.cpp and Ollama run.

The file is what llama.cpp's ``convert_hf_to_gguf.py`` (its ``LlamaModel``) writes for the same directory:

- tensors named through ``gguf``'s tensor name map (``blk.N.attn_q.weight``...), the Q and K projections
  permuted for llama.cpp's rotary embedding (``LlamaModel.permute``, with the key-value head count for K
  under grouped-query attention), no ``output.weight`` when the embeddings are tied, and Llama 3's
  ``rope_freqs`` tensor for ``rope_type: llama3``;
- tensor types as its ``prepare_tensors`` picks them: 1-D tensors, norms and biases in F32, every other
  weight in the requested type (``f32``, ``f16``, ``bf16`` or ``q8_0``, quantized by ``gguf.quants``; a row
  whose length is not a multiple of Q8_0's block of 32 falls back to F16, as there);
- the ``llama.*`` hyperparameters (context, widths, heads, rope base, rope scaling, RMS norm epsilon, head
  and rope dimensions, vocabulary size), ``general.*`` from ``gguf.Metadata`` and ``general.file_type``;
- the tokenizer as its ``_set_vocab_gpt2`` writes a byte-level BPE: ``tokenizer.ggml.model`` ``gpt2``, the
  tokens (ids beyond the tokenizer up to the embedding size as ``[PADn]``, unused), their types (control,
  user-defined, normal), the merges, the special-token ids, ``add_bos_token`` / ``add_eos_token`` and the
  chat template (``gguf.SpecialVocab``), and ``tokenizer.ggml.pre``, the pre-tokenizer llama.cpp must run;
- or, for a SentencePiece-style BPE (Llama 1/2, Meditron: ``byte_fallback``, ``<0x00>``..``<0xFF>`` byte
  tokens, ``▁`` for spaces), as its ``_set_vocab_llama_hf`` writes one: ``tokenizer.ggml.model`` ``llama``,
  the tokens and types from ``gguf.LlamaHfVocab`` (byte tokens BYTE, special ones CONTROL; the unknown token
  UNKNOWN, added non-special tokens USER_DEFINED, as ``_create_vocab_sentencepiece`` types them), a score
  per token, the special-token ids, ``add_bos_token`` / ``add_eos_token``, ``add_space_prefix`` and the chat
  template; no merges (llama.cpp's SentencePiece tokenizer joins pieces by score).

Where this differs from the script, it is so the file behaves exactly as the checkpoint does:
``tokenizer.ggml.pre`` is read from ``tokenizer.json``'s pre-tokenizer (the script hashes the token ids
of a test string against the models it knows, which a newly trained tokenizer never is), and a
pre-tokenizer llama.cpp has no type for is refused rather than written with a guess; ``add_bos_token``
and ``add_eos_token`` are always written, as the tokenizer behaves (whether encoding a text adds the BOS
and EOS tokens), where the script writes what ``tokenizer_config.json`` states, if anything (Ollama adds a
BOS token when the key is absent); a ``lm_head.weight`` stored beside tied embeddings is not written (the
model never reads it); every tensor is quantized from float32 (the script quantizes float16 weights in
float16 arithmetic). For a SentencePiece-style BPE the scores are real: ``LlamaHfVocab`` writes -1000 for
every token, and llama.cpp, which joins the pair of pieces that makes the best-scoring token first, would
then join them left to right; here a token's score is minus the rank of the first merge that makes it, so
llama.cpp joins pieces in the merges' order. That reproduces the merges exactly only if llama.cpp's rule (join
any two pieces that make a token) and the merge list agree: every pair of pieces that makes a token must be a
merge, and the merges making one token must be consecutive -- true of every merge list converted from a
``tokenizer.model`` (Llama 2's, Meditron's); a list that is not (one trained with ``tokenizers``' BpeTrainer)
is refused. Spaces: llama.cpp puts a space before the text and after each special token, then writes
spaces as ``▁``, as sentencepiece does and as the legacy normalizer (``Prepend("▁")``, ``Replace(" ",
"▁")``) does; transformers' ``LlamaTokenizer`` (``Metaspace``) adds no ``▁`` to a text that already starts
with a space, and with ``prepend_scheme: first`` none after a special token, so those two cases tokenize
differently in llama.cpp, as they do for every Llama 2 GGUF.

Weights stream one tensor at a time from the safetensors files (memory-mapped) into the file, which is
written under a temporary name and renamed into place whole. Anything the export cannot write faithfully
(another architecture, a Unigram tokenizer, a pre-tokenizer or normalizer llama.cpp has no counterpart for,
an activation or rope type llama.cpp's ``llama`` does not run) is refused with one line naming the field.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from medfoundry.errors import ConfigError, InputError
from medfoundry.extras import require
from medfoundry.io import atomic_path

# --type -> (general.file_type, the type of every weight that is not kept in F32)
OUT_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
             "q8_0": ("MOSTLY_Q8_0", "Q8_0")}  # fmt: skip
DEFAULT_TYPE = "f16"  # convert_hf_to_gguf.py's default --outtype
ARCHITECTURES = ("LlamaForCausalLM",)
ROPE_TYPES = ("default", "linear", "yarn", "llama3")  # what llama.cpp's llama architecture computes as transformers
_SKIPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # as in prepare_tensors

# pre-tokenizers llama.cpp implements, as a byte-level BPE tokenizer.json spells them (llama-vocab.cpp's regexes)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def export_gguf(model_dir: Path, out_path: Path, out_type: str = DEFAULT_TYPE) -> Path:
    """Write the LLaMA-family checkpoint ``model_dir`` (config.json, safetensors weights, a byte-level BPE or
    SentencePiece-style BPE tokenizer) as the GGUF file ``out_path``, weights in ``out_type`` (``f32``, ``f16``,
    ``bf16``, ``q8_0``)."""
    from medfoundry.model.load import check_checkpoint, load_tokenizer

    gguf = require("gguf", "GGUF export")
    if out_type not in OUT_TYPES:
        raise ConfigError(f"--type {out_type!r}: expected one of {', '.join(OUT_TYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    check_checkpoint(model_dir)  # config.json, a tokenizer, no code of its own
    hparams = _llama_hparams(model_dir)
    tokenizer = load_tokenizer(model_dir)
    file_type, weight_type = (getattr(gguf.LlamaFileType, OUT_TYPES[out_type][0]),
                              getattr(gguf.GGMLQuantizationType, OUT_TYPES[out_type][1]))  # fmt: skip
    plan = _tensor_plan(model_dir, hparams, weight_type)
    vocab = _read_vocab(model_dir, tokenizer, hparams)  # everything is checked before the output is touched
    with atomic_path(out_path) as tmp, ExitStack() as files:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        files.callback(writer.close)
        for tensor in plan:
            writer.add_tensor_info(tensor.name, tensor.stored_shape, tensor.numpy_dtype, tensor.nbytes, tensor.raw)
        _add_general(writer, model_dir)
        _add_hparams(writer, hparams, file_type)
        _add_vocab(writer, vocab)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensor_data(plan, hparams, files):
            writer.write_tensor_data(data)
        writer.close()
    return out_path


# ---------------------------------------------------------------------------------------------- hyperparameters


def _llama_hparams(model_dir: Path) -> dict:
    """``config.json`` as transformers reads it (``AutoConfig(...).to_dict()``, as the script does: the rope
    fields normalized into ``rope_parameters``, ``head_dim`` filled in), once it is known to be LLaMA-family."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    architectures = raw.get("architectures") or []
    if list(architectures) != list(ARCHITECTURES[:1]) or raw.get("model_type") != "llama":
        raise InputError(
            str(path),
            f"architectures {architectures} (model_type {raw.get('model_type')!r}): GGUF export writes "
            "LLaMA-family checkpoints (LlamaForCausalLM, model_type llama) only",
        )
    hparams = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False).to_dict()
    if hparams.get("hidden_act", "silu") != "silu":
        raise InputError(str(path), f"hidden_act {hparams['hidden_act']!r}: llama.cpp's llama architecture uses silu")
    if hparams.get("mlp_bias"):
        raise InputError(str(path), "mlp_bias true: llama.cpp's llama architecture has no feed-forward biases")
    rope = _rope_parameters(hparams)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise InputError(
            str(path),
            f"rope_parameters.rope_type {rope_type!r}: llama.cpp's llama architecture runs {', '.join(ROPE_TYPES)}",
        )
    return hparams


def _rope_parameters(hparams: dict) -> dict:
    """The rope settings of the (full-attention) layers: ``TextModel.__init__``'s ``rope_parameters``."""
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and hparams.get("rope_theta") is not None:
        rope["rope_theta"] = hparams["rope_theta"]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    return rope


def _head_dim(hparams: dict) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def _add_general(writer, model_dir: Path) -> None:
    """``general.*`` as ``prepare_metadata`` writes it: name, size label... from the model card and config."""
    import gguf

    total, shared, expert, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    if metadata.name is None:
        metadata.name = model_dir.resolve().name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)


def _add_hparams(writer, hparams: dict, file_type) -> None:
    """``TextModel.set_gguf_parameters`` and ``LlamaModel.set_gguf_parameters``, for a LLaMA config."""
    import gguf

    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads") or hparams["num_attention_heads"])
    rope = _rope_parameters(hparams)
    rope_type, factor = rope.get("rope_type", "default"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(rope[key])
    # llama3: the frequency factors are the rope_freqs tensor
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if hparams.get("head_dim") is not None:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(file_type)
    writer.add_vocab_size(hparams["vocab_size"])
    writer.add_rope_dimension_count(_head_dim(hparams))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------- tensors


@dataclass
class _Tensor:
    """One tensor of the file: where it comes from, its GGUF name, type and stored shape."""

    file: Path | None  # None: computed (rope_freqs)
    source: str  # the safetensors name
    name: str  # the GGUF name
    shape: tuple[int, ...]  # as in PyTorch (rows first)
    qtype: object  # gguf.GGMLQuantizationType
    permute_heads: int | None = None  # Q/K: the head count to permute by

    @property
    def raw(self):
        import gguf

        plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        return None if self.qtype in plain else self.qtype

    @property
    def numpy_dtype(self):
        import gguf
        import numpy as np

        return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            self.qtype, np.uint8
        )

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The array ``write_tensor_data`` gets: the shape, or for a block type its shape in bytes."""
        from gguf.quants import quant_shape_to_byte_shape

        return self.shape if self.raw is None else quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        import numpy as np

        return math.prod(self.stored_shape) * np.dtype(self.numpy_dtype).itemsize


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files, in the order convert_hf_to_gguf.py reads them (sorted names)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise InputError(
            str(model_dir), "no safetensors weights (model.safetensors or model.safetensors.index.json) to export"
        )
    return [model_dir / name for name in names]


def _tensor_plan(model_dir: Path, hparams: dict, weight_type) -> list[_Tensor]:
    """Every tensor the file holds, in the order written, with its GGUF name and type; refuses a tensor
    llama.cpp's llama architecture has no place for, and names any it needs that the checkpoint lacks."""
    import gguf
    from safetensors import safe_open

    blocks = hparams["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    n_head = hparams["num_attention_heads"]
    n_kv = hparams.get("num_key_value_heads") or n_head
    tied = bool(hparams.get("tie_word_embeddings"))
    plan: list[_Tensor] = []
    rope = _rope_parameters(hparams)
    if rope.get("rope_type") == "llama3":  # generate_extra_tensors: first, as there
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_Tensor(None, "", name, (_head_dim(hparams) // 2,), gguf.GGMLQuantizationType.F32))
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as part:
            for source in part.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                if source.endswith(_SKIPPED) or (tied and source == "lm_head.weight"):
                    continue
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                base = source.rpartition(".")[0]
                if name is None or not _llama_tensor(name, blocks):
                    raise InputError(str(file), f"tensor {source}: no place for it in llama.cpp's llama architecture")
                shape = tuple(part.get_slice(source).get_shape())
                heads = n_head if base.endswith("q_proj") else n_kv if base.endswith("k_proj") else None
                plan.append(_Tensor(file, source, name, shape, _tensor_type(name, shape, weight_type), heads))
    _check_complete(model_dir, plan, blocks, tied)
    return plan


def _llama_tensor(name: str, blocks: int) -> bool:
    import gguf

    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]}
    known |= {n.format(bid=b) for n in known if "{bid}" in n for b in range(blocks)}
    return name.rpartition(".")[0] in known


def _tensor_type(name: str, shape: tuple[int, ...], weight_type):
    """``prepare_tensors``: 1-D tensors, norms and anything but a ``.weight`` in F32; a Q8_0 tensor whose rows
    are not whole blocks in F16 (its QuantError fallback); every other weight in ``weight_type``."""
    import gguf

    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    block_size = gguf.GGML_QUANT_SIZES[weight_type][0]
    if shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return weight_type


def _check_complete(model_dir: Path, plan: list[_Tensor], blocks: int, tied: bool) -> None:
    names = {t.name for t in plan}
    needed = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    for b in range(blocks):
        needed += [f"blk.{b}.{part}.weight" for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]  # fmt: skip
    missing = [name for name in needed if name not in names]
    if missing:
        raise InputError(str(model_dir), f"weights incomplete for llama.cpp: no {', '.join(missing[:4])}")


def permute(weights, n_head: int):
    """``LlamaModel.permute``: Hugging Face's rotary layout (the two halves of each head) to llama.cpp's
    (interleaved pairs). For K under grouped-query attention ``n_head`` is the key-value head count."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensor_data(plan: list[_Tensor], hparams: dict, files: ExitStack) -> Iterator:
    """Each tensor of ``plan`` as the array to write: read alone, in float32, permuted, quantized."""
    import torch
    from gguf.quants import quantize
    from safetensors import safe_open

    opened: dict[Path, object] = {}
    for tensor in plan:
        if tensor.file is None:
            data = _llama3_rope_factors(hparams)
        else:
            if tensor.file not in opened:
                opened[tensor.file] = files.enter_context(safe_open(str(tensor.file), framework="pt"))
            data = opened[tensor.file].get_tensor(tensor.source).to(torch.float32)
            if tensor.permute_heads is not None:
                data = permute(data, tensor.permute_heads)
        array = quantize(data.numpy(), tensor.qtype)
        if array.nbytes != tensor.nbytes:
            raise InputError(str(tensor.file), f"tensor {tensor.source} changed shape while it was exported")
        yield array
        del data, array


def _llama3_rope_factors(hparams: dict):
    """``LlamaModel.generate_extra_tensors``: Llama 3's per-frequency rope scaling factors."""
    import torch

    rope = _rope_parameters(hparams)
    base = rope.get("rope_theta", 10000.0)
    dim = _head_dim(hparams)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get(
        "original_max_position_embeddings", hparams.get("original_max_position_embeddings", 8192)
    )
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- tokenizer


@dataclass
class _Vocab:
    """The tokenizer as ``_set_vocab_gpt2`` (``model`` ``gpt2``) or ``_set_vocab_llama_hf`` (``llama``) writes it."""

    pre: str
    tokens: list[str]
    types: list[int]
    special: object  # gguf.SpecialVocab: merges (gpt2), special-token ids, add_bos / add_eos, chat template
    add_space_prefix: bool | None
    model: str = "gpt2"
    scores: list[float] | None = None  # llama: one per token


def _read_vocab(model_dir: Path, tokenizer, hparams: dict) -> _Vocab:
    """``LlamaModel.set_vocab`` for a byte-level BPE tokenizer (``_set_vocab_gpt2``) or a SentencePiece-style
    one (``_set_vocab_llama_hf``), or an :class:`InputError` naming what llama.cpp could not reproduce."""
    # the tokenizer as transformers runs it: its class may rebuild the normalizer and pre-tokenizer
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    if (loaded.get("model") or {}).get("type") == "BPE" and loaded["model"].get("byte_fallback"):
        return _read_llama_vocab(model_dir, tokenizer, hparams, loaded)
    tokenizer_json = _byte_level_bpe(model_dir)
    pre = pre_tokenizer_type(tokenizer_json, model_dir / "tokenizer.json")
    config_path = model_dir / "tokenizer_config.json"
    add_space_prefix = None
    if config_path.is_file():
        add_space_prefix = json.loads(config_path.read_text(encoding="utf-8")).get("add_prefix_space")
    tokens, types = _tokens(tokenizer, hparams["vocab_size"], model_dir)
    special = _special_vocab(model_dir, load_merges=True)
    if not special.merges:
        raise InputError(str(model_dir / "tokenizer.json"), "model.merges: a byte-level BPE tokenizer without merges")
    special.add_special_token.update(_added_special_tokens(tokenizer, model_dir))
    return _Vocab(pre, tokens, types, special, add_space_prefix)


def _special_vocab(model_dir: Path, **options):
    import gguf

    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its guesses about BOS and EOS from the post-processor: decided below instead
    try:
        return gguf.SpecialVocab(model_dir, **options)
    finally:
        quiet.setLevel(level)


def _add_vocab(writer, vocab: _Vocab) -> None:
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)


def _byte_level_bpe(model_dir: Path) -> dict:
    """``tokenizer.json``, once it is known to be a byte-level BPE tokenizer (what ``gpt2`` means to llama.cpp)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(str(model_dir), "no tokenizer.json: GGUF export writes a byte-level BPE tokenizer from it")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "BPE with byte_fallback" if model.get("byte_fallback") else repr(model.get("type"))
        raise InputError(
            str(path),
            f"model.type {kind}: GGUF export writes byte-level BPE (GPT-2, SmolLM, Llama 3) and SentencePiece-style "
            "BPE (byte_fallback: Llama 2, Meditron) tokenizers only",
        )
    if spec.get("normalizer") is not None:
        raise InputError(
            str(path), f"normalizer {spec['normalizer'].get('type')!r}: llama.cpp normalizes no byte-level BPE text"
        )
    return spec


def pre_tokenizer_type(spec: dict, path: Path) -> str:
    """``tokenizer.ggml.pre``: the llama.cpp pre-tokenizer that splits text as ``spec`` (a ``tokenizer.json``)
    does, or an :class:`InputError` naming its ``pre_tokenizer``."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges"))

    def byte_level(use_regex: bool) -> bool:
        step = steps[-1]
        return (
            step.get("type") == "ByteLevel"
            and not step.get("add_prefix_space")
            and step.get("use_regex", True) == use_regex
        )

    def split(pattern: str) -> bool:
        step = steps[0]
        regex = (step.get("pattern") or {}).get("Regex")
        return (
            step.get("type") == "Split"
            and regex == pattern
            and step.get("behavior") == "Isolated"
            and not step.get("invert")
        )

    found = None
    if len(steps) == 1 and byte_level(use_regex=True):
        found = "gpt-2"  # GPT-2's own rule, inside ByteLevel
    elif len(steps) == 2 and split(_GPT2_SPLIT) and byte_level(use_regex=False):
        found = "gpt-2"  # the same rule spelled out (medfoundry's gpt2 pre-tokenizer)
    elif (
        len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") and byte_level(True)
    ):
        found = "smollm"  # digits one by one, then GPT-2's rule (SmolLM, StarCoder)
    elif len(steps) == 2 and split(_LLAMA3_SPLIT) and byte_level(use_regex=False):
        found = "llama-bpe"  # Llama 3
    if found is not None and ignore_merges == (found == "llama-bpe"):  # llama.cpp ignores merges for llama-bpe only
        return found
    shown = json.dumps(pre, ensure_ascii=False)
    raise InputError(
        str(path),
        f"pre_tokenizer {shown[:160]}{'...' if len(shown) > 160 else ''} (model.ignore_merges {ignore_merges}): "
        "llama.cpp has no pre-tokenizer that splits text the same way, so the GGUF would tokenize differently "
        "(a tokenizer trained with pretokenizer: gpt2 is one it has)",
    )


def _tokens(tokenizer, vocab_size: int, model_dir: Path) -> tuple[list[str], list[int]]:
    """``get_vocab_base``: one token and type per embedding row (rows with no token are ``[PADn]``, unused)."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise InputError(
            str(model_dir / "config.json"),
            f"vocab_size {vocab_size}: the tokenizer has token ids up to {max(vocab.values())}, past the embeddings",
        )
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[index]
        if token in added:
            # llama.cpp takes CONTROL and USER_DEFINED tokens as already normalized
            if not decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[index].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _looks_special(token: str) -> bool:
    """``TextModel.does_token_look_special``: added tokens that ought to be control tokens though not special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _added_special_tokens(tokenizer, model_dir: Path) -> dict[str, bool]:
    """``add_bos`` / ``add_eos``: whether encoding a text adds the BOS and EOS tokens, as the tokenizer does it.
    Other tokens added around the text are refused: llama.cpp adds only these two."""
    text = "Hello"
    plain = tokenizer(text, add_special_tokens=False).input_ids
    full = tokenizer(text).input_ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    if start is None:
        raise InputError(str(model_dir / "tokenizer.json"), "post_processor changes the text's own tokens")
    before, after = full[:start], full[start + len(plain) :]
    if before not in ([], [tokenizer.bos_token_id]) or after not in ([], [tokenizer.eos_token_id]):
        raise InputError(
            str(model_dir / "tokenizer.json"),
            f"post_processor adds {tokenizer.convert_ids_to_tokens(before)} before and "
            f"{tokenizer.convert_ids_to_tokens(after)} after a text: llama.cpp can add only the BOS and EOS tokens",
        )
    return {"bos": bool(before), "eos": bool(after)}


# ---------------------------------------------------------------------------------------------- SentencePiece-style

BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))  # llama.cpp's byte fallback: all 256 must exist
_SPACE = "\u2581"  # "▁", sentencepiece's space


def _read_llama_vocab(model_dir: Path, tokenizer, hparams: dict, loaded: dict) -> _Vocab:
    """``_set_vocab_llama_hf`` for a SentencePiece-style BPE (``loaded``: the backend tokenizer as transformers
    runs it), with a real score per token and the types ``_create_vocab_sentencepiece`` gives."""
    import gguf

    path = model_dir / "tokenizer.json"
    add_space_prefix = sentencepiece_spaces(loaded, path)
    scores_by_token = sentencepiece_scores(loaded, path)
    if path.is_file():
        try:
            base = gguf.LlamaHfVocab(model_dir)
        except (FileNotFoundError, TypeError):  # its own test of a Llama tokenizer.json
            decoder = (json.loads(path.read_text(encoding="utf-8")).get("decoder") or {}).get("type")
            raise InputError(
                str(path),
                f"decoder {decoder!r}: a SentencePiece-style tokenizer decodes with a Sequence "
                "(Replace, ByteFallback, Fuse, Strip) as Llama's does",
            ) from None
        listed = [(text.decode("utf-8"), toktype) for text, _score, toktype in base.all_tokens()]
        scores = [scores_by_token.get(text, -1000.0) for text, _ in listed]
    elif (model_dir / "tokenizer.model").is_file():  # a sentencepiece model alone: its own scores
        try:
            base = gguf.SentencePieceVocab(model_dir)
        except RuntimeError:
            raise InputError(
                str(model_dir), "no tokenizer.json, and reading tokenizer.model needs the sentencepiece package"
            ) from None
        triples = list(base.all_tokens())
        listed = [(text.decode("utf-8"), toktype) for text, _score, toktype in triples]
        scores = [score for _text, score, _toktype in triples]
    else:
        raise InputError(str(model_dir), "no tokenizer.json: GGUF export reads the tokenizer from it")
    vocab_size = hparams["vocab_size"]
    if len(listed) > vocab_size:
        raise InputError(
            str(model_dir / "config.json"),
            f"vocab_size {vocab_size}: the tokenizer has {len(listed)} tokens, more than the embeddings",
        )
    if [text for text, _ in listed] != tokenizer.convert_ids_to_tokens(list(range(len(listed)))):
        raise InputError(str(path), "added_tokens: token ids are not consecutive (llama.cpp numbers tokens in order)")
    tokens, types = [text for text, _ in listed], [int(toktype) for _, toktype in listed]
    for index, added in tokenizer.added_tokens_decoder.items():  # as _create_vocab_sentencepiece types them
        if index >= len(tokens) or types[index] == gguf.TokenType.BYTE:
            continue
        token = added.content
        if added.special or _looks_special(token):
            types[index] = gguf.TokenType.CONTROL
        else:
            token = token.replace(_SPACE, " ")  # llama.cpp matches user-defined tokens in the raw text
            types[index] = gguf.TokenType.USER_DEFINED
        tokens[index], scores[index] = token, -1000.0
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < len(tokens):
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    for index in range(len(tokens), vocab_size):  # embedding rows past the tokenizer: unused
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    special = _special_vocab(model_dir, load_merges=False, n_vocab=len(tokens))
    special.add_special_token.update(_added_special_tokens(tokenizer, model_dir))
    return _Vocab("default", tokens, types, special, add_space_prefix, model="llama", scores=scores)


def _shown(step) -> str:
    shown = json.dumps(step, ensure_ascii=False)
    return shown[:160] + ("..." if len(shown) > 160 else "")


def sentencepiece_spaces(spec: dict, path: Path) -> bool:
    """``tokenizer.ggml.add_space_prefix`` for a SentencePiece-style ``spec`` (a ``tokenizer.json``): whether a
    ``▁`` goes before the text, or an :class:`InputError` naming a normalizer or pre-tokenizer llama.cpp has no
    counterpart for. llama.cpp writes every space as ``▁`` and splits nothing before joining pieces."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if normalizer is not None and pre is None:  # the legacy form: what sentencepiece itself does
        steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
        prepend = {"type": "Prepend", "prepend": _SPACE}
        if steps in ([prepend, replace], [replace, prepend], [replace]):
            return prepend in steps
        raise InputError(
            str(path),
            f"normalizer {_shown(normalizer)}: llama.cpp only writes spaces as \u2581 (and puts one before the text)",
        )
    if normalizer is None and pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if pre.get("split"):  # words split at each ▁: the same pieces, unless a token holds a ▁ past its start
            inner = next((t for t in (spec.get("model") or {}).get("vocab", {}) if _SPACE in t[1:]), None)
            if inner is not None:
                raise InputError(
                    str(path),
                    f"pre_tokenizer Metaspace split true with the token {inner!r}: llama.cpp does not split at "
                    "spaces, so it could join pieces across one",
                )
        if scheme in ("always", "first", "never"):
            return scheme != "never"
    shown = _shown(pre) if pre is not None else "null"
    raise InputError(
        str(path),
        f"pre_tokenizer {shown} (normalizer {_shown(normalizer) if normalizer else 'null'}): llama.cpp's "
        "SentencePiece tokenizer only writes spaces as \u2581 (Metaspace, or the Prepend and Replace normalizer)",
    )


def sentencepiece_scores(spec: dict, path: Path) -> dict[str, float]:
    """The score llama.cpp needs for each token of a SentencePiece-style BPE ``spec`` to join pieces in the
    order of its merges: minus the rank of the first merge making the token (0 for byte and special tokens,
    below every merge for the other pieces). An :class:`InputError` names what llama.cpp's rule cannot follow."""
    model = spec.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") or {}
    for key, bad in (("dropout", model.get("dropout")), ("ignore_merges", model.get("ignore_merges")),
                     ("continuing_subword_prefix", model.get("continuing_subword_prefix")),
                     ("end_of_word_suffix", model.get("end_of_word_suffix"))):  # fmt: skip
        if bad:
            raise InputError(str(path), f"model.{key} {bad!r}: llama.cpp's SentencePiece tokenizer has no such setting")
    missing = [token for token in BYTE_TOKENS if token not in vocab]
    if missing:
        raise InputError(
            str(path),
            f"model.vocab: no byte token {missing[0]} ({len(missing)} of <0x00>..<0xFF> missing), which llama.cpp's "
            "byte fallback needs",
        )
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        made = left + right
        if first.setdefault(made, rank) != rank and merges[rank - 1][0] + merges[rank - 1][1] != made:
            raise InputError(
                str(path),
                f"model.merges: the merges making {made!r} are not consecutive (ranks {first[made]} and {rank}): "
                "llama.cpp ranks the pieces a token is made of by that token's score alone",
            )
    pairs = set(merges)
    special = {added["content"] for added in spec.get("added_tokens") or []} | set(BYTE_TOKENS)
    special.add(model.get("unk_token"))
    for token in vocab:
        if token in special:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab and (left, right) not in pairs:
                raise InputError(
                    str(path),
                    f"model.merges: no merge of {left!r} and {right!r}, which make the token {token!r}: llama.cpp "
                    "joins any two pieces that make a token (a merge list converted from tokenizer.model has them all)",
                )
        outside = next((char for char in token if char not in vocab), None)
        if outside is not None:
            raise InputError(
                str(path),
                f"model.vocab: the token {token!r} holds {outside!r}, which is no token: llama.cpp would use it "
                "where the tokenizer falls back to bytes",
            )
    return {token: (-float(first[token]) if token in first else 0.0 if token in special else -float(len(merges)))
            for token in vocab}  # fmt: skip
