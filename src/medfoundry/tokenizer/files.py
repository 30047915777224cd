"""Load a fast tokenizer from a Hugging Face directory (either layout) or a GGUF model file.

Tokenizer folders are untrusted input: transformers only ever loads them from local files and never runs
code they ship (``auto_map`` in ``tokenizer_config.json``) unless the caller passes ``trust_remote_code``."""

from __future__ import annotations

import json
from pathlib import Path

from medfoundry.errors import InputError


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer embedded in a GGUF file (e.g. SmolLM2's), through transformers (needs ``gguf``)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "GGUF file not found")
    return AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
    )


def load_hf_tokenizer(directory: str | Path, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(directory)`` offline; a tokenizer that asks to run its own Python code
    (``auto_map``) is an :class:`InputError` naming its ``tokenizer_config.json`` unless ``trust_remote_code``."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    config = directory / "tokenizer_config.json"
    if not trust_remote_code and config.is_file():
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as exc:
            raise InputError(str(config), f"not a readable JSON object ({exc})") from None
        if auto_map:
            raise InputError(
                str(config),
                f"refused: 'auto_map' asks to run Python code shipped with the tokenizer "
                f"({auto_map!r:.200}), and medfoundry never runs a checkpoint's code unless "
                "told to trust it (trust_remote_code=True)",
            )
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code)


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
