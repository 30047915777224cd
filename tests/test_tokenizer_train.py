"""`medfoundry tokenizer train`: a byte-level BPE on a corpus's train split, in Hugging Face format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import shared, smollm2_gguf
from medfoundry.config import validate
from medfoundry.errors import InputError
from medfoundry.tokenizer.config import BIOMEDLM_TERMS, TokenizerTrainConfig
from medfoundry.tokenizer.pretokenize import byte_level_pretokenizer
from medfoundry.tokenizer.train import train_tokenizer


def write_corpus(root: Path, n_train: int, n_val: int) -> Path:
    """A corpus directory in `corpus build` output format, from real abstracts."""
    docs = []
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt") as fh:
        for i, line in zip(range(n_train + n_val), fh):
            rec = json.loads(line)
            docs.append(
                {
                    "id": f"abstracts/{i}",
                    "text": ((rec["title"] or "") + "\n\n" + rec["abstract"]).strip(),
                    "source": "abstracts" if i % 10 else "replay",
                    "meta": {},
                }
            )
    for split, chunk in (("train", docs[:n_train]), ("val", docs[n_train:])):
        (root / split).mkdir(parents=True)
        with gzip.open(root / split / "part-00000.jsonl.gz", "wt") as fh:
            fh.writelines(json.dumps(d) + "\n" for d in chunk)
    (root / "manifest.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 3000, 300)


def _cfg(corpus: Path, out: Path, **extra) -> TokenizerTrainConfig:
    tree = {
        "corpus_dir": str(corpus),
        "output_dir": str(out),
        "vocab_size": 6000,
        "fertility": {"references": {"gpt2": str(shared("tokenizers/gpt2"))}, "top_domain_words": 5},
    }
    return validate(TokenizerTrainConfig, {**tree, **extra})


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return out, train_tokenizer(_cfg(corpus, out))


def _val_texts(corpus: Path) -> list[str]:
    with gzip.open(corpus / "val" / "part-00000.jsonl.gz", "rt") as fh:
        return [json.loads(line)["text"] for line in fh]


def test_autotokenizer_loads_offline_with_special_tokens(trained, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    out, manifest = trained
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert len(tok) == manifest.counts["vocab_size"] == 6000
    ids = tok("<|im_start|>user\nIs aspirin safe?<|im_end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.convert_ids_to_tokens(ids).count("<|im_start|>") == 1  # kept whole, never split into pieces
    assert set(json.loads((out / "special_tokens_map.json").read_text())) >= {
        "eos_token",
        "pad_token",
        "additional_special_tokens",
    }


def test_round_trip_on_real_abstracts(trained, corpus):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained[0] / "tokenizer.json"))
    texts = _val_texts(corpus)
    assert all(tok.decode(e.ids) == t for e, t in zip(tok.encode_batch(texts, add_special_tokens=False), texts))


def test_training_is_deterministic(trained, corpus, tmp_path):
    train_tokenizer(_cfg(corpus, tmp_path / "again"))
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (trained[0] / "tokenizer.json").read_bytes()


def test_fertility_report_compares_with_gpt2(trained):
    out, _manifest = trained
    report = json.loads((out / "fertility.json").read_text())
    ours, gpt2 = report["tokenizers"]["medfoundry"], report["tokenizers"]["gpt2"]
    assert report["documents"] == 300 and report["words"] > 50_000
    assert ours["tokens_per_word"] < gpt2["tokens_per_word"]
    assert 0 < ours["split_word_share"] < 1 and 0 < gpt2["split_word_share"] < 1
    assert gpt2["chars_per_token"] == pytest.approx(report["characters"] / gpt2["tokens"])
    assert all(term in report["terms"] for term in BIOMEDLM_TERMS) and len(report["terms"]) == len(BIOMEDLM_TERMS) + 5
    assert report["terms"]["cytotoxicity"]["gpt2"] == [" cyt", "ot", "oxicity"]
    md = (out / "fertility.md").read_text()
    assert "| gpt2 |" in md and "vs gpt2" in md and "cytotoxicity" in md


def test_biomedical_pretokenizer_keeps_compounds():
    pieces = [
        p
        for p, _ in byte_level_pretokenizer("biomedical").pre_tokenize_str(
            "IL-6 and COVID-19 at 0.05 mg/kg of 5-fluorouracil"
        )
    ]
    assert pieces == ["IL-6", "Ġand", "ĠCOVID-19", "Ġat", "Ġ0.05", "Ġmg/kg", "Ġof", "Ġ5-fluorouracil"]
    gpt2 = [p for p, _ in byte_level_pretokenizer("gpt2").pre_tokenize_str("IL-6 at 0.05")]
    assert gpt2 == ["IL", "-", "6", "Ġat", "Ġ0", ".", "05"]


def test_sources_and_character_cap_select_training_text(corpus, tmp_path):
    only = train_tokenizer(_cfg(corpus, tmp_path / "a", sources=["replay"], fertility={"top_domain_words": 0}))
    assert only.counts["training_documents"] == 300  # every 10th document is labelled replay
    capped = train_tokenizer(_cfg(corpus, tmp_path / "b", max_chars=100_000, fertility={"top_domain_words": 0}))
    assert 100_000 <= capped.counts["training_characters"] < 100_000 + 10_000


def test_output_replaced_whole_and_bad_corpus_named(corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    train_tokenizer(_cfg(corpus, out, fertility={"top_domain_words": 0}))
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").is_file()
    with pytest.raises(InputError, match="no manifest.json"):
        train_tokenizer(_cfg(tmp_path / "nowhere", tmp_path / "x"))


@pytest.fixture(scope="module")
def extended(corpus, tmp_path_factory):
    from medfoundry.tokenizer.config import ExtendConfig
    from medfoundry.tokenizer.extend import extend_tokenizer

    out = tmp_path_factory.mktemp("ext") / "gpt2_extended"
    cfg = validate(
        ExtendConfig,
        {
            "base_dir": str(shared("tokenizers/gpt2")),
            "corpus_dir": str(corpus),
            "output_dir": str(out),
            "add_tokens": 300,
            "min_frequency": 5,
        },
    )
    return out, extend_tokenizer(cfg)


def test_extension_keeps_every_existing_id(extended):
    from tokenizers import Tokenizer

    from medfoundry.model.load import load_backend_tokenizer

    out, manifest = extended
    base = load_backend_tokenizer(shared("tokenizers/gpt2"))
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    base_vocab, new_vocab = base.get_vocab(), new.get_vocab()
    assert all(new_vocab[token] == i for token, i in base_vocab.items())
    ext = json.loads((out / "vocab_extension.json").read_text())
    assert ext["base_vocab_size"] == 50257 and ext["vocab_size"] == 50257 + 300 == manifest.counts["vocab_size"]
    assert ext["added_ids"] == list(range(50257, 50557))
    assert [new.id_to_token(i) for i in ext["added_ids"]] == ext["added_tokens"]


def test_extension_makes_chosen_words_single_tokens_and_saves_tokens(extended, corpus):
    from tokenizers import Tokenizer

    out, manifest = extended
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    words = json.loads((out / "vocab_extension.json").read_text())["words"]
    assert len(words) > 50
    for entry in words:
        assert [t.value for t in new.model.tokenize(entry["word"])] == [entry["word"]]
        assert entry["id"] >= 50257
    texts = _val_texts(corpus)
    assert all(new.decode(e.ids) == t for e, t in zip(new.encode_batch(texts), texts))
    fert = manifest.details["fertility"]
    assert fert["extended"]["tokens_per_word"] < fert["base"]["tokens_per_word"]


def test_extended_gpt2_loads_in_transformers(extended, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(extended[0]))
    assert len(tok) == 50557 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256


def test_extend_smollm2_tokenizer_from_gguf(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from medfoundry.tokenizer.config import ExtendConfig
    from medfoundry.tokenizer.extend import extend_tokenizer

    out = tmp_path / "smol_extended"
    cfg = validate(
        ExtendConfig,
        {
            "base_dir": str(smollm2_gguf()),
            "corpus_dir": str(corpus),
            "output_dir": str(out),
            "add_tokens": 200,
            "min_frequency": 5,
            "fertility": {"top_domain_words": 0},
        },
    )
    manifest = extend_tokenizer(cfg)
    assert manifest.counts["base_vocab_size"] == 49152 and manifest.counts["vocab_size"] == 49352
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 49352 and tok.eos_token == "<|im_end|>" and tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Define cytotoxicity."}], tokenize=True)
    ids = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    assert (
        manifest.details["fertility"]["extended"]["tokens_per_word"]
        < manifest.details["fertility"]["base"]["tokens_per_word"]
    )
