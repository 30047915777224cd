"""``medfoundry tokenizer extend``: add the most useful domain words to an existing BPE tokenizer.

Each new word becomes a chain of BPE merges appended after the base merges (``Ġcyt + ot``,
``Ġcytot + oxicity``), with new ids after the last existing one. Base merges keep their ranks and
every existing token keeps its id, so a checkpoint trained with the base tokenizer only needs new
embedding rows (``vocab_extension.json`` lists them). Words are chosen greedily by the tokens they
save on the corpus's train split (frequency x (pieces - 1)) until the budget of new entries is spent.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, models

from medfoundry.corpus.documents import iter_documents
from medfoundry.errors import InputError
from medfoundry.io import atomic_dir, write_json, write_text
from medfoundry.manifest import Manifest, inputs_fingerprint, output_fingerprint
from medfoundry.model.load import is_gguf, load_backend_tokenizer, load_tokenizer, resolve_reference
from medfoundry.tokenizer.config import ExtendConfig
from medfoundry.tokenizer.fertility import domain_words, fertility_markdown, fertility_report

_FIX_ROUNDS = 4
# what is read of a base tokenizer directory (its encoding and the configs copied beside the extension)
_BASE_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def piece_counts(tokenizer: Tokenizer, texts) -> Counter:
    """How often each pre-tokenized piece (a word with its leading space, in byte-level form) occurs."""
    counts: Counter = Counter()
    pre, norm = tokenizer.pre_tokenizer, tokenizer.normalizer
    for text in texts:
        counts.update(p for p, _ in pre.pre_tokenize_str(norm.normalize_str(text) if norm else text))
    return counts


class _Bpe:
    """A BPE vocabulary and merge list that can grow, and rebuild a model to check itself."""

    def __init__(self, model: dict, first_new_id: int):
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.next_id = first_new_id
        self.added: list[str] = []
        self.options = {
            k: model.get(k)
            for k in (
                "dropout",
                "unk_token",
                "continuing_subword_prefix",
                "end_of_word_suffix",
                "fuse_unk",
                "byte_fallback",
            )
        }

    def merge(self, left: str, right: str) -> None:
        self.merges.append((left, right))
        if left + right not in self.vocab:
            self.vocab[left + right] = self.next_id
            self.next_id += 1
            self.added.append(left + right)

    def model(self) -> models.BPE:
        return models.BPE(self.vocab, self.merges, **{k: v for k, v in self.options.items() if v is not None})

    def to_json(self, model: dict) -> dict:
        return {**model, "vocab": self.vocab, "merges": [list(m) for m in self.merges]}


def _new_entries(pieces: list[str], vocab: dict) -> int:
    prefix, needed = pieces[0], 0
    for piece in pieces[1:]:
        prefix += piece
        needed += prefix not in vocab
    return needed


def choose_words(base: Tokenizer, counts: Counter, budget: int, min_frequency: int) -> list[tuple[str, list[str], int]]:
    """Candidate words by tokens saved, best first: (word, its base pieces, count)."""
    model = base.model
    scored = []
    for word, count in counts.items():
        if count < min_frequency:
            continue
        pieces = [t.value for t in model.tokenize(word)]
        if len(pieces) > 1:
            scored.append((count * (len(pieces) - 1), word, pieces, count))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [(word, pieces, count) for _, word, pieces, count in scored]


def extend_bpe(base: Tokenizer, counts: Counter, budget: int, min_frequency: int) -> tuple[dict, list[dict]]:
    data = json.loads(base.to_str())
    if data["model"]["type"] != "BPE":
        raise InputError("base_dir", f"only BPE tokenizers can be extended, this one is {data['model']['type']}")
    first_new = 1 + max([*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))])
    bpe = _Bpe(data["model"], first_new)
    chosen = []
    for word, pieces, count in choose_words(base, counts, budget, min_frequency):
        if len(bpe.added) + _new_entries(pieces, bpe.vocab) > budget:
            continue
        for piece in pieces[1:]:
            bpe.merge(pieces[0], piece)
            pieces = [pieces[0] + piece, *pieces[2:]]
        chosen.append((word, count))
        if len(bpe.added) >= budget:
            break
    _fix_preempted(bpe, [w for w, _ in chosen])
    data["model"] = bpe.to_json(data["model"])
    words = [{"word": w, "count": c, "id": bpe.vocab.get(w)} for w, c in chosen]
    return data, words


def _fix_preempted(bpe: _Bpe, words: list[str]) -> None:
    """A later word's merge can be pre-empted by an earlier word's lower-ranked merge on a shared pair;
    add the merges that finish such words (their full string is already in the vocabulary)."""
    for _ in range(_FIX_ROUNDS):
        model = bpe.model()
        broken = [[t.value for t in model.tokenize(w)] for w in words]
        broken = [p for p in broken if len(p) > 1]
        if not broken:
            return
        for pieces in broken:
            while len(pieces) > 1:
                bpe.merge(pieces[0], pieces[1])
                pieces = [pieces[0] + pieces[1], *pieces[2:]]


def _texts(cfg: ExtendConfig, split: str):
    used = 0
    for doc in iter_documents(cfg.corpus_dir, split, cfg.sources):
        if split == "train" and cfg.max_chars and used >= cfg.max_chars:
            return
        used += len(doc["text"])
        yield doc["text"]


def _copy_configs(base_dir: Path, out: Path, tokenizer: Tokenizer, gguf_tokenizer=None) -> None:
    """The base's tokenizer_config / special_tokens_map (and chat template), or GPT-2's conventions when it has none."""
    if gguf_tokenizer is not None:
        gguf_tokenizer.save_pretrained(str(out))
        config = json.loads((out / "tokenizer_config.json").read_text())
        write_json(out / "tokenizer_config.json", {**config, "tokenizer_class": "PreTrainedTokenizerFast"})
        return
    copied = False
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, out / name)
            copied = True
    if not copied and tokenizer.token_to_id("<|endoftext|>") is not None:
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        write_json(
            out / "tokenizer_config.json",
            {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False},
        )
        write_json(out / "special_tokens_map.json", special)


def extend_tokenizer(cfg: ExtendConfig) -> Manifest:
    start = time.perf_counter()
    base_dir = resolve_reference(cfg.base_dir)  # a Hub id: its snapshot in the Hugging Face cache
    gguf = load_tokenizer(base_dir) if is_gguf(base_dir) else None
    base = gguf.backend_tokenizer if gguf is not None else load_backend_tokenizer(base_dir)
    counts = piece_counts(base, _texts(cfg, "train"))
    data, words = extend_bpe(base, counts, cfg.add_tokens, cfg.min_frequency)
    extended = Tokenizer.from_str(json.dumps(data))
    base_size, new_size = base.get_vocab_size(), extended.get_vocab_size()
    added_ids = sorted(i for i in extended.get_vocab().values() if i >= base_size)
    with atomic_dir(cfg.output_dir) as tmp:
        _copy_configs(base_dir, tmp, extended, gguf)
        extended.save(str(tmp / "tokenizer.json"))
        extension = {
            "base_dir": cfg.base_dir,
            "base_vocab_size": base_size,
            "vocab_size": new_size,
            "added_ids": added_ids,
            "added_tokens": [extended.id_to_token(i) for i in added_ids],
            "words": words,
        }
        write_json(tmp / "vocab_extension.json", extension)
        texts = list(_texts(cfg, "val"))[: cfg.fertility.max_docs]
        references = {"base": base, **{n: load_backend_tokenizer(p) for n, p in cfg.fertility.references.items()}}
        terms = cfg.fertility.terms + domain_words(
            texts, cfg.fertility.top_domain_words, cfg.fertility.min_word_chars, base
        )
        report = fertility_report(texts, {"extended": extended, **references}, list(dict.fromkeys(terms)))
        write_json(tmp / "fertility.json", report)
        write_text(tmp / "fertility.md", fertility_markdown(report, "base"))
        manifest = Manifest(
            stage="tokenizer_extend",
            config=cfg.model_dump(mode="json"),
            inputs={
                cfg.base_dir: inputs_fingerprint(base_dir, names=None if gguf is not None else _BASE_FILES),
                cfg.corpus_dir: output_fingerprint(cfg.corpus_dir),
            },
            outputs={"tokenizer": "tokenizer.json", "extension": "vocab_extension.json", "fertility": "fertility.md"},
            counts={"base_vocab_size": base_size, "vocab_size": new_size, "words_added": len(words)},
            timings={"total_s": time.perf_counter() - start},
            details={"fertility": report["tokenizers"]},
        )
        manifest.write(tmp)
    return manifest
