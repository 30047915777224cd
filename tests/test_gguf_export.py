"""GGUF export (``medfoundry convert --to gguf``): a Hugging Face LLaMA checkpoint written the way llama.cpp's
convert_hf_to_gguf.py writes it, read back with medfoundry's own GGUF import (``load_gguf``, ``load_tokenizer``).

The fast tests use a tiny random LLaMA (grouped-query attention, 4 query and 2 key-value heads, untied or tied
embeddings) with a byte-level BPE tokenizer trained here, ChatML template and all. Measured on it (logits up
to 7.2), the largest logit difference from the source model is 0 for f32 (bit-identical), 0.013 for f16,
0.13 for bf16 and 0.32 for q8_0; the tolerances below are about twice that. Each type's weights are
also checked exactly: f32 identical, f16 and bf16 the source rounded to nearest even, q8_0 within half a
quantization step of each 32-value block. The round trip of the real SmolLM2-135M-Instruct (its GGUF
converted to a checkpoint, exported in f32, imported again) takes minutes on 2 cores: it is marked ``long``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from medfoundry.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Acetaminophen 500 mg q6h; IL-6 levels rose in COVID-19 patients.",
    "The capital of France is Paris.",
    "Hello world! 123 4567 tokens   spaced\n\nlines",
    "mg/kg dosing of 5-fluorouracil in T-cell lymphoma",
]
TEXTS = [
    "Hello world! 123",
    "  spaced\n\nlines <|im_end|> after a special token",
    "IL-6 ↑ in COVID-19, 5-fluorouracil 10 mg/kg",
    "",
]
VOCAB_SIZE = 448  # the embedding rows: more than the tokenizer's tokens, as a padded vocabulary has
# max |logit difference| allowed per type, about twice the measured one (see the module docstring)
TOLERANCE = {"f32": 0.0, "f16": 0.03, "bf16": 0.25, "q8_0": 0.6}


def make_tokenizer(directory: Path, bos_first: bool = False):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) with ChatML's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS * 50, trainer)
    if bos_first:  # a tokenizer that starts every text with its BOS token, as Llama 3's does
        backend.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def make_model(directory: Path, tied: bool = False, **config):
    """A random LLaMA with grouped-query attention, saved in ``directory`` (float32 safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
    with torch.no_grad():  # weights large enough that the logits differ clearly from token to token
        for parameter in model.parameters():
            parameter.normal_(0, 0.2) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    model.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_tokenizer(directory)
    make_model(directory)
    return directory


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The checkpoint exported once in each type."""
    from medfoundry.model.gguf_export import OUT_TYPES, export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(checkpoint, out / f"tiny-{kind}.gguf", kind) for kind in OUT_TYPES}


def reference(checkpoint: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True).eval()


def prompt_ids(directory: Path) -> torch.Tensor:
    from medfoundry.model.load import load_tokenizer

    return load_tokenizer(directory)(CORPUS[0] + " " + CORPUS[1], return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------- weights, logits


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_import_of_the_export_gives_the_source_logits(checkpoint, exported, kind):
    from medfoundry.model.convert import load_gguf

    source, imported = reference(checkpoint), load_gguf(exported[kind])
    ids = prompt_ids(checkpoint)
    with torch.no_grad():
        want, got = source(ids).logits, imported(ids).logits
    difference = (got - want).abs().max().item()
    print(f"\n{kind}: max |logit difference| {difference:.4g} (logits up to {want.abs().max().item():.3g})")
    assert difference <= TOLERANCE[kind]
    if kind == "f32":
        assert torch.equal(got, want)
    for name, weight in source.state_dict().items():
        back = imported.state_dict()[name]
        if kind == "f32" or weight.dim() == 1:  # norms stay float32 in every type
            assert torch.equal(back, weight), name
        elif kind in ("f16", "bf16"):
            rounded = weight.to(torch.float16 if kind == "f16" else torch.bfloat16).float()
            assert torch.equal(back, rounded), name
        else:  # q8_0: 32-value blocks of int8 times an fp16 scale max|block| / 127
            blocks, error = weight.reshape(-1, 32), (back - weight).reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            assert (error.abs() <= step * 0.57).all(), name  # half a step, plus the scale's fp16 rounding


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    import gguf

    from medfoundry.model.convert import load_gguf
    from medfoundry.model.gguf_export import export_gguf

    make_tokenizer(tmp_path)
    source = make_model(tmp_path, tied=True)
    out = export_gguf(tmp_path, tmp_path / "tied.gguf", "f32")
    names = [tensor.name for tensor in gguf.GGUFReader(out).tensors]
    assert "output.weight" not in names and "token_embd.weight" in names
    imported = load_gguf(out)
    assert imported.lm_head.weight is imported.get_input_embeddings().weight
    ids = prompt_ids(tmp_path)
    with torch.no_grad():
        assert torch.equal(imported(ids).logits, source(ids).logits)


def test_sharded_checkpoint_gives_the_same_file_contents(checkpoint, exported, tmp_path):
    import gguf

    from medfoundry.model.gguf_export import export_gguf

    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    reference(checkpoint).save_pretrained(str(sharded), max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    out = export_gguf(sharded, tmp_path / "sharded.gguf", "f32")

    def tensors(path: Path) -> dict:
        return {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}

    assert tensors(out) == tensors(exported["f32"])


# ---------------------------------------------------------------------------------------------- what llama.cpp reads


def fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def test_metadata_and_tensors_llama_cpp_requires(checkpoint, exported):
    import gguf
    from safetensors.torch import load_file

    from medfoundry.model.gguf_export import permute

    meta = fields(exported["q8_0"])
    config = json.loads((checkpoint / "config.json").read_text())
    assert {key: meta[key] for key in meta if key.startswith("llama.")} == {
        "llama.block_count": 2,
        "llama.context_length": 128,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(config["rms_norm_eps"]),
        "llama.attention.key_length": 16,
        "llama.attention.value_length": 16,
        "llama.vocab_size": VOCAB_SIZE,
        "llama.rope.dimension_count": 16,
    }
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model" and meta["general.name"]
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB_SIZE
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]  # control
    assert tokens[-1] == f"[PAD{VOCAB_SIZE - 1}]" and types[-1] == 5  # rows past the tokenizer: unused
    assert {kind for token, kind in zip(tokens[3:], types[3:]) if not token.startswith("[PAD")} == {1}  # normal
    merges = json.loads((checkpoint / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (meta["tokenizer.ggml.padding_token_id"], meta["tokenizer.ggml.unknown_token_id"]) == (2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == CHATML

    reader = gguf.GGUFReader(exported["q8_0"])
    types_by_name = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(types_by_name) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{b}.{part}.weight" for b in range(2) for part in per_block
    }
    assert {types_by_name[name] for name in types_by_name if "norm" in name} == {"F32"}
    assert {types_by_name[name] for name in types_by_name if "norm" not in name} == {"Q8_0"}

    # Q and K rows in llama.cpp's rotary order (K permuted by its 2 key-value heads), V as it is
    weights = load_file(str(checkpoint / "model.safetensors"))
    stored = {tensor.name: torch.from_numpy(tensor.data.copy()) for tensor in gguf.GGUFReader(exported["f32"]).tensors}
    layer = "model.layers.1.self_attn"
    assert torch.equal(stored["blk.1.attn_q.weight"], permute(weights[f"{layer}.q_proj.weight"], 4))
    assert torch.equal(stored["blk.1.attn_k.weight"], permute(weights[f"{layer}.k_proj.weight"], 2))
    assert torch.equal(stored["blk.1.attn_v.weight"], weights[f"{layer}.v_proj.weight"])
    assert not torch.equal(stored["blk.1.attn_k.weight"], weights[f"{layer}.k_proj.weight"])


def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path):
    import gguf
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from medfoundry.model.gguf_export import export_gguf

    make_tokenizer(tmp_path)
    cases = {
        "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
        "llama3": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }
    written = {}
    for name, rope in cases.items():
        make_model(tmp_path, rope_parameters=rope)
        out = export_gguf(tmp_path, tmp_path / f"{name}.gguf", "f16")
        written[name] = {key: value for key, value in fields(out).items() if ".rope." in key}
        if name == "llama3":
            reader = gguf.GGUFReader(out)
            factors = torch.from_numpy(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.copy())
    assert written["linear"]["llama.rope.scaling.type"] == "linear"
    assert written["linear"]["llama.rope.scaling.factor"] == 2.0
    assert written["yarn"]["llama.rope.scaling.type"] == "yarn"
    assert written["yarn"]["llama.rope.scaling.factor"] == 4.0
    assert written["yarn"]["llama.rope.scaling.original_context_length"] == 32
    assert written["llama3"]["llama.rope.freq_base"] == 500000.0
    assert not any("scaling" in key for key in written["llama3"])
    # llama.cpp divides each base frequency by its rope_freqs factor: that must be transformers' llama3 frequency
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=cases["llama3"])
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert torch.allclose(base / factors, scaled, rtol=1e-6)
    assert factors.max() == 8 and factors.min() < 8  # the highest frequencies scaled less


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_and_chat_template_survive_the_round_trip(checkpoint, exported):
    from medfoundry.model.load import load_tokenizer

    source, imported = load_tokenizer(checkpoint), load_tokenizer(exported["f16"])
    for text in TEXTS:
        assert imported(text).input_ids == source(text).input_ids, text
        assert imported.decode(imported(text).input_ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "IL-6?"}]
    assert imported.chat_template == source.chat_template == CHATML
    for generation_prompt in (False, True):
        rendered = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert imported.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == (
            rendered
        )
        assert imported(rendered).input_ids == source(rendered).input_ids
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    assert [getattr(imported, n) for n in names] == [getattr(source, n) for n in names] == [1, 2, 2, 0]


def test_add_bos_follows_what_the_tokenizer_does(tmp_path):
    from medfoundry.model.gguf_export import export_gguf
    from medfoundry.model.load import load_tokenizer

    make_tokenizer(tmp_path, bos_first=True)
    make_model(tmp_path)
    assert load_tokenizer(tmp_path)("Hi").input_ids[0] == 1
    meta = fields(export_gguf(tmp_path, tmp_path / "bos.gguf", "q8_0"))
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False


def test_pre_tokenizer_type_of_each_byte_level_rule(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from medfoundry.model.gguf_export import _LLAMA3_SPLIT, pre_tokenizer_type
    from medfoundry.tokenizer.pretokenize import byte_level_pretokenizer

    def spec(pre, ignore_merges=False) -> dict:
        backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre
        return json.loads(backend.to_str())

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    where = tmp_path / "tokenizer.json"
    assert pre_tokenizer_type(spec(pre_tokenizers.ByteLevel(add_prefix_space=False)), where) == "gpt-2"
    assert pre_tokenizer_type(spec(byte_level_pretokenizer("gpt2")), where) == "gpt-2"  # medfoundry's gpt2 rule
    smollm = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert pre_tokenizer_type(spec(smollm), where) == "smollm"
    llama3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level])
    assert pre_tokenizer_type(spec(llama3, ignore_merges=True), where) == "llama-bpe"
    for refused in (
        spec(byte_level_pretokenizer("biomedical")),  # keeps IL-6 whole: llama.cpp has no such rule
        spec(llama3),  # Llama 3's rule without its ignore_merges
        spec(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    ):
        with pytest.raises(InputError, match="pre_tokenizer") as caught:
            pre_tokenizer_type(refused, where)
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- refusals, CLI


def test_refuses_what_it_cannot_write_faithfully(checkpoint, tmp_path):
    from medfoundry.model.gguf_export import export_gguf

    def variant(name: str, edit) -> Path:
        directory = tmp_path / name
        shutil.copytree(checkpoint, directory)
        edit(directory)
        return directory

    def set_config(**values):
        def edit(directory: Path) -> None:
            config = json.loads((directory / "config.json").read_text())
            (directory / "config.json").write_text(json.dumps({**config, **values}))

        return edit

    def sentencepiece_style(directory: Path) -> None:
        spec = json.loads((directory / "tokenizer.json").read_text())
        spec["model"]["byte_fallback"] = True
        (directory / "tokenizer.json").write_text(json.dumps(spec))

    def drop_a_tensor(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(directory / "model.safetensors"))
        del weights["model.layers.1.mlp.up_proj.weight"]
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})

    cases = {
        "gpt2": (set_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "architectures"),
        "gelu": (set_config(hidden_act="gelu"), "hidden_act"),
        "dynamic": (set_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type"),
        "spm": (sentencepiece_style, "pre_tokenizer"),  # byte_fallback with a byte-level pre-tokenizer
        "incomplete": (drop_a_tensor, "blk.1.ffn_up.weight"),
    }
    for name, (edit, field) in cases.items():
        out = tmp_path / f"{name}.gguf"
        with pytest.raises(InputError, match=field) as caught:
            export_gguf(variant(name, edit), out, "f16")
        assert "\n" not in str(caught.value), name
        assert not out.exists() and not list(tmp_path.glob(f".{name}.gguf.*")), name  # nothing half-written


def test_cli_converts_both_ways(checkpoint, tmp_path, capsys):
    from medfoundry.cli import main

    gguf_file, back = tmp_path / "tiny.gguf", tmp_path / "back"
    assert main(["convert", str(checkpoint), str(gguf_file), "--type", "q8_0"]) == 0
    assert "(GGUF, q8_0)" in capsys.readouterr().out
    assert fields(gguf_file)["general.file_type"] == 7
    assert main(["convert", str(gguf_file), str(back)]) == 0  # the default direction: GGUF -> checkpoint
    assert "(Hugging Face checkpoint)" in capsys.readouterr().out and (back / "config.json").is_file()
    assert main(["convert", str(back), str(tmp_path / "again.gguf"), "--to", "gguf"]) == 0  # and back again
    capsys.readouterr()
    for argv, says in (
        ([str(checkpoint), str(tmp_path / "x.gguf"), "--dtype", "bfloat16"], "--dtype"),
        ([str(gguf_file), str(tmp_path / "y"), "--type", "f16"], "--type"),
        ([str(checkpoint), str(tmp_path / "not-a-gguf-name")], "*.gguf"),
        ([str(gguf_file), str(tmp_path / "z.gguf"), "--to", "gguf"], "GGUF file already"),
    ):
        assert main(["convert", *argv]) == 2
        assert says in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.long
def test_smollm2_round_trip_in_f32(tmp_path):
    """SmolLM2-135M-Instruct: its GGUF -> checkpoint (the existing import) -> f32 GGUF -> the import again gives
    the same logits, the same tokens and the same chat template."""
    from conftest import smollm2_gguf
    from medfoundry.model.convert import convert_gguf, load_gguf
    from medfoundry.model.gguf_export import export_gguf
    from medfoundry.model.load import load_tokenizer

    original = smollm2_gguf()
    start = time.perf_counter()
    hf = convert_gguf(original, tmp_path / "hf")
    converted = time.perf_counter()
    out = export_gguf(hf, tmp_path / "smollm2-f32.gguf", "f32")
    exported = time.perf_counter()
    print(f"\nGGUF -> checkpoint {converted - start:.1f} s, checkpoint -> f32 GGUF {exported - converted:.1f} s")
    meta = fields(out)
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # the checkpoint's tokenizer (see the README: smollm's digits)
    assert meta["llama.attention.head_count_kv"] == 3 and meta["llama.rope.freq_base"] == 100000.0
    assert meta["tokenizer.ggml.add_bos_token"] is False
    source, imported = reference(hf), load_gguf(out)
    tokenizer, reread = load_tokenizer(hf), load_tokenizer(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(imported(ids).logits, source(ids).logits)
        answer = imported.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1] :])
    for text in [*TEXTS, "Acetaminophen 500 mg q6h; 333 <|im_start|>"]:
        assert reread(text).input_ids == tokenizer(text).input_ids, text
    chat = [{"role": "user", "content": "hi"}]
    assert reread.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
    assert math.isclose(out.stat().st_size / 1e6, 540, rel_tol=0.01)  # 134.5M float32 weights, no output.weight


# ---------------------------------------------------------------------------------------------- SentencePiece-style

LLAMA2_TEXTS = [
    "Hello world! 123",
    "The patients (n = 42) received 5-fluorouracil 10 mg/kg.",
    " leading space and  two\n\nnewlines\tand a tab",
    "Unseen: ↑ IL-6 in Zürich, 東京 — 😀",
    "digits 0123456789 and 3.14159",
    "<s> and </s> inside, <|im_start|>user\nhi<|im_end|>",
    "",
]


def make_llama2_tokenizer(directory: Path):
    """A Llama-2-style tokenizer as transformers writes one converted from a ``tokenizer.model``: BPE with byte
    fallback, ``<unk>``, ``<s>``, ``</s>`` then the 256 ``<0x..>`` byte tokens as pieces of the model (ids 3..258),
    trained on real abstracts, and every pair of pieces that makes a piece as a merge, best (lowest id) first, as
    the converter lists them. ChatML's two tokens are added as special tokens, with its template."""
    import gzip

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from conftest import shared
    from medfoundry.model.gguf_export import BYTE_TOKENS

    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt", encoding="utf-8") as lines:
        abstracts = [json.loads(next(lines))["abstract"] for _ in range(300)]
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], max_token_length=12)
    trained.train_from_iterator(abstracts, trainer)
    learned = sorted(trained.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    pieces = ["<unk>", "<s>", "</s>", *BYTE_TOKENS] + [t for t, _ in learned if t not in ("<unk>", "<s>", "</s>")]
    vocab = {token: index for index, token in enumerate(pieces)}
    merges = generate_merges(vocab, {t: -i for t, i in vocab.items()}, skip_tokens=["<unk>", "<s>", "</s>"])
    backend = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(directory))
    return tokenizer


@pytest.fixture(scope="module")
def llama2_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama2")
    tokenizer = make_llama2_tokenizer(directory)
    make_model(directory, vocab_size=len(tokenizer) + 30, pad_token_id=None)  # padded, as Meditron's is
    return directory


@pytest.fixture(scope="module")
def llama2_exported(llama2_checkpoint, tmp_path_factory) -> Path:
    from medfoundry.model.gguf_export import export_gguf

    return export_gguf(llama2_checkpoint, tmp_path_factory.mktemp("gguf2") / "tiny-llama2-f32.gguf", "f32")


def test_sentencepiece_tokenizer_survives_the_round_trip(llama2_checkpoint, llama2_exported):
    from medfoundry.model.convert import load_gguf
    from medfoundry.model.load import load_tokenizer

    source, imported = load_tokenizer(llama2_checkpoint), load_tokenizer(llama2_exported)
    bytes_used = 0
    for text in LLAMA2_TEXTS:
        ids = source(text).input_ids
        assert imported(text).input_ids == ids, text
        assert imported.decode(ids, skip_special_tokens=False) == source.decode(ids, skip_special_tokens=False)
        bytes_used += sum(token.startswith("<0x") for token in source.convert_ids_to_tokens(ids))
    assert bytes_used > 10  # the texts do reach the byte fallback
    assert source("Hi").input_ids[0] == 1 and source("Hi").input_ids[-1] != 2  # BOS added, no EOS, as Llama 2
    names = ("bos_token_id", "eos_token_id", "unk_token_id")
    assert [getattr(imported, n) for n in names] == [getattr(source, n) for n in names] == [1, 2, 0]
    messages = [{"role": "user", "content": "IL-6?"}]
    rendered = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert imported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    assert imported(rendered).input_ids == source(rendered).input_ids

    ids = source(LLAMA2_TEXTS[1] + LLAMA2_TEXTS[3], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(load_gguf(llama2_exported)(ids).logits, reference(llama2_checkpoint)(ids).logits)


def test_sentencepiece_metadata_llama_cpp_reads(llama2_checkpoint, llama2_exported):
    import gguf

    from medfoundry.model.gguf_export import BYTE_TOKENS
    from medfoundry.model.load import load_tokenizer

    meta = fields(llama2_exported)
    source = load_tokenizer(llama2_checkpoint)
    size = json.loads((llama2_checkpoint / "config.json").read_text())["vocab_size"]
    tokens, types, scores = (meta[f"tokenizer.ggml.{key}"] for key in ("tokens", "token_type", "scores"))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in meta  # llama.cpp joins pieces by score
    assert len(tokens) == len(types) == len(scores) == size == meta["llama.vocab_size"]
    assert tokens[: 3 + 256] == ["<unk>", "<s>", "</s>", *BYTE_TOKENS]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    im_start = source.convert_tokens_to_ids("<|im_start|>")
    assert tokens[im_start] == "<|im_start|>" and types[im_start] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED and tokens[-1] == f"[PAD{size - 1}]"
    normal = [i for i, kind in enumerate(types) if kind == gguf.TokenType.NORMAL]
    assert len(normal) == len(source) - 3 - 256 - 2
    # a merged piece scores minus the rank of its first merge: the merges' order, best first
    merges = json.loads(source.backend_tokenizer.to_str())["model"]["merges"]
    first = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    assert all(scores[i] == -first[tokens[i]] for i in normal if tokens[i] in first)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.unknown_token_id"] == 0 and meta["tokenizer.chat_template"] == CHATML


def test_sentencepiece_spaces_and_merges_llama_cpp_cannot_follow_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from medfoundry.model.gguf_export import BYTE_TOKENS, sentencepiece_scores, sentencepiece_spaces

    where = tmp_path / "tokenizer.json"
    vocab = {t: i for i, t in enumerate(["<unk>", *BYTE_TOKENS, "\u2581", "a", "b", "c", "ab", "bc", "abc"])}

    def spec(merges, pre=None, normalizer=None, **bpe) -> dict:
        backend = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", **bpe))
        backend.pre_tokenizer, backend.normalizer = pre, normalizer
        return json.loads(backend.to_str())

    complete = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
    scores = sentencepiece_scores(spec(complete), where)
    assert (scores["ab"], scores["bc"], scores["abc"], scores["<0x41>"], scores["a"]) == (0, -1, -2, 0, -4)
    legacy = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    assert sentencepiece_spaces(spec(complete, normalizer=legacy), where) is True
    for scheme, prefix in (("always", True), ("first", True), ("never", False)):
        metaspace = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=True)
        assert sentencepiece_spaces(spec(complete, pre=metaspace), where) is prefix
    for refused, field in (
        (lambda: sentencepiece_scores(spec(complete[:3]), where), "no merge of 'a' and 'bc'"),  # BpeTrainer's list
        (lambda: sentencepiece_scores(spec(complete, ignore_merges=True), where), "model.ignore_merges"),
        (lambda: sentencepiece_spaces(spec(complete, pre=pre_tokenizers.Whitespace()), where), "pre_tokenizer"),
        (lambda: sentencepiece_spaces(spec(complete, normalizer=normalizers.NFKC()), where), "normalizer"),
    ):
        with pytest.raises(InputError, match=field) as caught:
            refused()
        assert "\n" not in str(caught.value)
    scattered = [("a", "b"), ("ab", "c"), ("b", "c"), ("a", "bc")]  # 'abc' made at ranks 1 and 3, 'bc' between
    with pytest.raises(InputError, match="not consecutive"):
        sentencepiece_scores(spec(scattered), where)
    no_bytes = {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True}
    with pytest.raises(InputError, match="byte token <0x00>"):
        sentencepiece_scores({"model": no_bytes}, where)


def test_refuses_sentencepiece_style_tokenizers_llama_cpp_cannot_reproduce(llama2_checkpoint, checkpoint, tmp_path):
    from tokenizers import Tokenizer, models

    from medfoundry.model.gguf_export import export_gguf
    from medfoundry.tokenizer.pretokenize import byte_level_pretokenizer

    def variant(name: str, source: Path, edit, tokenizer_class: str | None = None) -> Path:
        directory = tmp_path / name
        shutil.copytree(source, directory)
        spec = json.loads((directory / "tokenizer.json").read_text())
        (directory / "tokenizer.json").write_text(json.dumps(edit(spec) or spec))
        if tokenizer_class:  # transformers' LlamaTokenizer would rebuild its own pre-tokenizer
            config = json.loads((directory / "tokenizer_config.json").read_text())
            (directory / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
        return directory

    def biomedical(spec: dict) -> None:
        spec["pre_tokenizer"] = json.loads(byte_level_pretokenizer("biomedical").__getstate__())

    def as_trained(spec: dict) -> None:  # BpeTrainer's list: one merge per token, so some pairs are missing
        made = set()
        spec["model"]["merges"] = [
            m for m in spec["model"]["merges"] if "".join(m) not in made and not made.add("".join(m))
        ]

    def unigram(spec: dict) -> dict:
        return json.loads(Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0)).to_str())

    cases = {
        "biomedical": (llama2_checkpoint, biomedical, "PreTrainedTokenizerFast", "pre_tokenizer"),
        "trained": (llama2_checkpoint, as_trained, None, "model.merges"),
        "unigram": (checkpoint, unigram, None, "model.type 'Unigram'"),
    }
    for name, (source, edit, tokenizer_class, field) in cases.items():
        out = tmp_path / f"{name}.gguf"
        with pytest.raises(InputError, match=field) as caught:
            export_gguf(variant(name, source, edit, tokenizer_class), out, "f32")
        assert "\n" not in str(caught.value), name
        assert not out.exists(), name
