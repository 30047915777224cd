"""Train a 28,896-token domain tokenizer on the shared corpus's abstracts, compare it with GPT-2, and
tokenize the whole shared corpus into shards.

Prints one JSON object as its last line: train_wall_s, tokenize_wall_s, tokens, tokens_per_s,
fertility_domain, fertility_gpt2 (tokens per word on held-out abstracts: the corpus's validation
split), the relative gain, single_token_terms, and the same for a plain byte-level BPE (GPT-2's
pre-tokenization rule) as the ablation. Targets: gain >= 12%, all five BioMedLM terms single
tokens, tokenization of the whole corpus < 30 s.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from corpus_bench import DATA, corpus_config
from medfoundry.config import validate
from medfoundry.corpus.build import build_corpus
from medfoundry.corpus.config import CorpusConfig
from medfoundry.runtime import configure
from medfoundry.tokenizer.config import BIOMEDLM_TERMS, TokenizerTrainConfig
from medfoundry.tokenizer.shards import tokenize_corpus
from medfoundry.tokenizer.train import train_tokenizer


def train(corpus: Path, out: Path, rule: str) -> tuple[dict, float]:
    cfg = validate(
        TokenizerTrainConfig,
        {
            "corpus_dir": str(corpus),
            "output_dir": str(out),
            "vocab_size": 28_896,
            "pretokenizer": rule,
            "sources": ["abstracts"],
            "fertility": {"references": {"gpt2": str(DATA / "tokenizers" / "gpt2")}},
        },
    )
    start = time.perf_counter()
    manifest = train_tokenizer(cfg)
    return manifest, time.perf_counter() - start


def summary(directory: Path) -> dict:
    report = json.loads((directory / "fertility.json").read_text())
    ours, gpt2 = report["tokenizers"]["medfoundry"]["tokens_per_word"], report["tokenizers"]["gpt2"]["tokens_per_word"]
    singles = [t for t in BIOMEDLM_TERMS if len(report["terms"][t]["medfoundry"]) == 1]
    return {
        "fertility_domain": round(ours, 4),
        "fertility_gpt2": round(gpt2, 4),
        "gain": round(1 - ours / gpt2, 4),
        "single_token_terms": singles,
        "heldout_words": report["words"],
    }


def main() -> None:
    if not DATA.is_dir():
        sys.exit(f"needs {DATA} (the shared data folder)")
    configure()
    with tempfile.TemporaryDirectory(prefix="tokenizer_bench_") as tmp:
        tmp = Path(tmp)
        corpus_manifest = build_corpus(validate(CorpusConfig, corpus_config(tmp, 0), "tokenizer_bench"))
        corpus = tmp / "corpus"
        manifest, train_wall = train(corpus, tmp / "tokenizer", "biomedical")
        result = {
            "train_wall_s": round(train_wall, 2),
            "bpe_train_s": round(manifest.timings["train_s"], 2),
            "train_chars": manifest.counts["training_characters"],
            **summary(tmp / "tokenizer"),
        }
        start = time.perf_counter()
        shards = tokenize_corpus(corpus, tmp / "tokenizer", tmp / "tokens")
        tokenize_wall = time.perf_counter() - start
        tokens = shards.counts["train_tokens"] + shards.counts["val_tokens"]
        _, plain_wall = train(corpus, tmp / "plain", "gpt2")
        plain = summary(tmp / "plain")
    result.update(
        {
            "tokenize_wall_s": round(tokenize_wall, 2),
            "tokens": tokens,
            "tokens_per_s": round(tokens / tokenize_wall),
            "corpus_docs": corpus_manifest.counts["documents_train"] + corpus_manifest.counts["documents_val"],
            "plain_bpe": {
                "fertility_domain": plain["fertility_domain"],
                "gain": plain["gain"],
                "single_token_terms": plain["single_token_terms"],
                "train_wall_s": round(plain_wall, 2),
            },
            "targets": {"gain": 0.12, "single_token_terms": 5, "tokenize_wall_s": 30},
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
