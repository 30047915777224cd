"""``medfoundry tokenizer train``: a byte-level BPE on a corpus's train split, saved in Hugging Face format.

The directory holds ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
(``AutoTokenizer.from_pretrained`` loads it offline with no medfoundry code), plus ``fertility.{json,md}``
measured on the corpus's validation split beside the reference tokenizers, and ``manifest.json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from medfoundry.corpus.documents import iter_documents
from medfoundry.io import atomic_dir, write_json, write_text
from medfoundry.manifest import MANIFEST, Manifest, output_fingerprint
from medfoundry.model.load import load_backend_tokenizer
from medfoundry.tokenizer.config import TokenizerTrainConfig
from medfoundry.tokenizer.fertility import domain_words, fertility_markdown, fertility_report
from medfoundry.tokenizer.pretokenize import byte_level_pretokenizer


def training_texts(cfg: TokenizerTrainConfig, stats: dict) -> Iterator[str]:
    """The train split's texts (optionally some sources only, optionally capped), counting what was used."""
    stats.update(documents=0, characters=0)
    for doc in iter_documents(cfg.corpus_dir, "train", cfg.sources):
        if cfg.max_chars and stats["characters"] >= cfg.max_chars:
            return
        stats["documents"] += 1
        stats["characters"] += len(doc["text"])
        yield doc["text"]


def new_tokenizer(cfg: TokenizerTrainConfig) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level_pretokenizer(cfg.pretokenizer)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(cfg: TokenizerTrainConfig, texts: Iterator[str], documents: int | None = None) -> Tokenizer:
    """Deterministic: the same texts and settings give the same vocabulary and merges. The trainer's own
    progress bars (reading the ``documents`` texts, then merging) show on a terminal, as tqdm's do."""
    tokenizer = new_tokenizer(cfg)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens.all(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer, length=documents)
    return tokenizer


def train_documents(cfg: TokenizerTrainConfig) -> int | None:
    """Documents of the train split (of ``cfg.sources``) as the corpus manifest counts them, for the progress
    bar's total; None when the manifest does not say (a corpus not made by ``corpus build``)."""
    try:
        per_source = json.loads((Path(cfg.corpus_dir) / MANIFEST).read_text())["details"]["per_source"]["train"]
        return sum(entry["docs"] for name, entry in per_source.items() if not cfg.sources or name in cfg.sources)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_hf(tokenizer: Tokenizer, directory: Path, cfg: TokenizerTrainConfig) -> None:
    """``tokenizer.json`` plus the two config files, written in the form every transformers release
    (4.x and 5.x, and so lm-eval and vLLM) loads as a fast tokenizer. GPT-2 convention: bos = eos = unk."""
    special = cfg.special_tokens
    tokenizer.save(str(directory / "tokenizer.json"))
    tokens = {
        "bos_token": special.eos,
        "eos_token": special.eos,
        "unk_token": special.eos,
        "pad_token": special.pad,
        "additional_special_tokens": [*special.chat, *special.extra],
    }
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in special.all()
    }
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tokens,
            "model_max_length": cfg.model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": added,
        },
    )
    write_json(directory / "special_tokens_map.json", tokens)


def fertility(cfg: TokenizerTrainConfig, tokenizer: Tokenizer, directory: Path) -> dict:
    texts = [d["text"] for d in iter_documents(cfg.corpus_dir, "val", cfg.sources)][: cfg.fertility.max_docs]
    references = {name: load_backend_tokenizer(path) for name, path in cfg.fertility.references.items()}
    baseline = next(iter(references), None)
    frequent = domain_words(
        texts, cfg.fertility.top_domain_words, cfg.fertility.min_word_chars, references.get(baseline)
    )
    report = fertility_report(
        texts, {"medfoundry": tokenizer, **references}, list(dict.fromkeys(cfg.fertility.terms + frequent))
    )
    write_json(directory / "fertility.json", report)
    write_text(directory / "fertility.md", fertility_markdown(report, baseline))
    return report


def train_tokenizer(cfg: TokenizerTrainConfig) -> Manifest:
    start = time.perf_counter()
    used: dict = {}
    tokenizer = train_bpe(cfg, training_texts(cfg, used), train_documents(cfg))
    train_s = time.perf_counter() - start
    with atomic_dir(cfg.output_dir) as tmp:
        save_hf(tokenizer, tmp, cfg)
        report = fertility(cfg, tokenizer, tmp)
        manifest = Manifest(
            stage="tokenizer",
            config=cfg.model_dump(mode="json"),
            inputs={cfg.corpus_dir: output_fingerprint(cfg.corpus_dir)},
            outputs={"tokenizer": "tokenizer.json", "fertility": "fertility.md"},
            counts={
                "vocab_size": tokenizer.get_vocab_size(),
                "training_documents": used["documents"],
                "training_characters": used["characters"],
            },
            timings={"train_s": train_s, "total_s": time.perf_counter() - start},
            details={
                "special_token_ids": {t: tokenizer.token_to_id(t) for t in cfg.special_tokens.all()},
                "fertility": report["tokenizers"],
            },
        )
        manifest.write(tmp)
    return manifest
