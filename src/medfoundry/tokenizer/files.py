"""Load a fast tokenizer from a Hugging Face directory (either layout) or a GGUF model file."""

from __future__ import annotations

from pathlib import Path

from medfoundry.errors import InputError


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer embedded in a GGUF file (e.g. SmolLM2's), through transformers (needs ``gguf``)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "GGUF file not found")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_fast_tokenizer(directory: str | Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, GPT-2-style ``vocab.json`` + ``merges.txt``, or a ``.gguf`` file."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    directory = Path(directory)
    if directory.suffix == ".gguf":
        return load_gguf_tokenizer(directory).backend_tokenizer
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tokenizer = Tokenizer(BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise InputError(str(directory), "not a tokenizer directory: expected tokenizer.json, or vocab.json and merges.txt")
