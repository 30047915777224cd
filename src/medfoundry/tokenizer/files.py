"""Load a fast tokenizer from a directory in either Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

from medfoundry.errors import InputError


def load_fast_tokenizer(directory: str | Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, or from GPT-2-style ``vocab.json`` + ``merges.txt``."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tokenizer = Tokenizer(BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise InputError(str(directory), "not a tokenizer directory: expected tokenizer.json, or vocab.json and merges.txt")
