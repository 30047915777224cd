"""Pre-tokenization rules: how text is cut into pieces before BPE merges (merges never cross pieces).

GPT-2's rule cuts at every change between letters, digits and punctuation, so biomedical compounds
are always several pieces: ``IL-6`` is ``IL``, ``-``, ``6``. The biomedical rule keeps as one piece
a word joined by ``-`` or ``/`` to further letters or digits (IL-6, COVID-19, T-cell, mg/kg), a
number joined to a word (5-fluorouracil, 24-h), and a decimal or grouped number (0.05, 1,000); BPE
can then learn the frequent ones as whole tokens. On held-out PubMed abstracts this takes a
28,896-token vocabulary from 11.0% to 14.8% fewer tokens per word than GPT-2 (benchmarks/tokenizer_bench.py).
Both rules are lossless: decoding returns the exact input.
"""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
_TAIL = r" ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

PATTERNS = {
    "gpt2": rf"{_CONTRACTIONS}| ?\p{{L}}+| ?\p{{N}}+|{_TAIL}",
    "biomedical": (
        rf"{_CONTRACTIONS}"
        r"| ?\p{L}+(?:[-/][\p{L}\p{N}]+)*"  # words and compounds: IL-6, COVID-19, T-cell, mg/kg
        r"| ?\p{N}+(?:[-/]\p{L}[\p{L}\p{N}]*)+"  # number-word compounds: 5-fluorouracil, 24-h
        r"| ?\p{N}+(?:[.,]\p{N}+)?"  # numbers with a decimal or grouping separator: 0.05, 1,000
        rf"|{_TAIL}"
    ),
}


def byte_level_pretokenizer(rule: str):
    """Split with ``rule``'s pattern, then map bytes to GPT-2's printable byte alphabet."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS[rule]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
