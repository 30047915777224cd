"""Fertility: how many tokens a tokenizer spends on a text, and how it splits domain terms.

Words are whitespace-separated strings (punctuation attached), the unit BioMedLM and most
tokenizer comparisons count. A word is "split" when, encoded as it appears mid-sentence (with its
leading space), it takes more than one token.
"""

from __future__ import annotations

import re
from collections import Counter

from tokenizers import Tokenizer, decoders

_LONG_WORD = re.compile(r"[A-Za-z]+")
_BATCH = 512


def _token_counts(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    counts = []
    for start in range(0, len(texts), _BATCH):
        counts += [len(e.ids) for e in tokenizer.encode_batch(texts[start : start + _BATCH], add_special_tokens=False)]
    return counts


def measure(tokenizer: Tokenizer, texts: list[str], word_counts: Counter) -> dict:
    tokens = sum(_token_counts(tokenizer, texts))
    words = sum(word_counts.values())
    distinct = list(word_counts)
    pieces = _token_counts(tokenizer, [" " + w for w in distinct])
    split = sum(word_counts[w] for w, n in zip(distinct, pieces) if n > 1)
    return {
        "tokens": tokens,
        "tokens_per_word": tokens / max(words, 1),
        "chars_per_token": sum(map(len, texts)) / max(tokens, 1),
        "split_word_share": split / max(words, 1),
        "tokens_per_doc": tokens / max(len(texts), 1),
    }


def pieces(tokenizer: Tokenizer, term: str) -> list[str]:
    """How ``term`` is cut when it appears inside a sentence (after a space)."""
    decoder = decoders.ByteLevel()
    return [decoder.decode([t]) for t in tokenizer.encode(" " + term, add_special_tokens=False).tokens]


def domain_words(texts: list[str], top: int, min_chars: int, reference: Tokenizer | None = None) -> list[str]:
    """The most frequent purely alphabetic words of at least ``min_chars`` letters that the reference
    tokenizer (a general-domain one) splits into several tokens: where a domain vocabulary can help."""
    counts = Counter(w for text in texts for w in _LONG_WORD.findall(text) if len(w) >= min_chars)
    ranked = [w for w, _ in counts.most_common()]
    if reference is not None:
        ranked = [w for w, n in zip(ranked, _token_counts(reference, [" " + w for w in ranked])) if n > 1]
    return ranked[:top]


def fertility_report(texts: list[str], tokenizers: dict[str, Tokenizer], terms: list[str]) -> dict:
    word_counts = Counter(w for text in texts for w in text.split())
    return {
        "documents": len(texts),
        "words": sum(word_counts.values()),
        "characters": sum(map(len, texts)),
        "tokenizers": {name: measure(tok, texts, word_counts) for name, tok in tokenizers.items()},
        "terms": {term: {name: pieces(tok, term) for name, tok in tokenizers.items()} for term in terms},
    }


def fertility_markdown(report: dict, baseline: str | None = None) -> str:
    names = list(report["tokenizers"])
    lines = [
        "# Tokenizer fertility",
        f"{report['documents']:,} validation documents, {report['words']:,} words, "
        f"{report['characters']:,} characters.",
        "",
        "| tokenizer | tokens/word | chars/token | words split | tokens/doc |"
        + (f" vs {baseline} |" if baseline else ""),
        "|---|---|---|---|---|" + ("---|" if baseline else ""),
    ]
    base = report["tokenizers"].get(baseline) if baseline else None
    for name, m in report["tokenizers"].items():
        row = (
            f"| {name} | {m['tokens_per_word']:.4f} | {m['chars_per_token']:.3f} | "
            f"{100 * m['split_word_share']:.1f}% | {m['tokens_per_doc']:.1f} |"
        )
        if base:
            row += f" {100 * (m['tokens_per_word'] / base['tokens_per_word'] - 1):+.1f}% |"
        lines.append(row)
    lines += [
        "",
        "## Terms as they appear inside a sentence",
        "",
        "| term | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for term, splits in report["terms"].items():
        cells = [f"{len(p)}: `{'·'.join(x.replace(' ', '␣') for x in p)}`" for p in (splits[n] for n in names)]
        lines.append(f"| {term} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
