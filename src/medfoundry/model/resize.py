"""Grow a model's vocabulary for a tokenizer extended with new ids (``medfoundry tokenizer extend``).

New embedding rows start at the mean of the existing rows (input and output matrices separately)
rather than at random: the logits of existing tokens are unchanged, each new token starts with the
average logit, so the loss does not jump when training continues (Hewitt, 2021, "Initializing New
Word Embeddings for Pretrained Language Models").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medfoundry.errors import ConfigError, InputError


def vocab_size(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def grow_embeddings(model, new_vocab_size: int) -> list[int]:
    """Append rows up to ``new_vocab_size`` (mean-initialized) and return the new ids; a tied head stays tied."""
    old = vocab_size(model)
    if new_vocab_size < old:
        raise ConfigError(
            f"cannot shrink the vocabulary from {old:,} to {new_vocab_size:,} tokens: "
            f"existing token ids would lose their embeddings"
        )
    if new_vocab_size == old:
        return []
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        input_mean = model.get_input_embeddings().weight.float().mean(dim=0)
        output_mean = None if head is None or tied else head.weight.float().mean(dim=0)
        model.resize_token_embeddings(new_vocab_size, mean_resizing=False)  # also sets config.vocab_size
        model.get_input_embeddings().weight[old:] = input_mean
        if output_mean is not None:
            model.get_output_embeddings().weight[old:] = output_mean
    return list(range(old, new_vocab_size))


def resize_for_tokenizer(model, tokenizer_dir, *, grow: bool = False) -> dict:
    """Fit the model's embeddings to the tokenizer of ``tokenizer_dir``.

    With a ``vocab_extension.json`` (an extended tokenizer) the base model is grown to the extended
    size. Otherwise a tokenizer larger than the model's vocabulary is an error unless ``grow`` is set
    (its extra tokens are then treated as appended). A model larger than its tokenizer (padded
    vocabularies) is left as is.
    """
    tokenizer_dir = Path(tokenizer_dir)
    model_size = vocab_size(model)
    extension = tokenizer_dir / "vocab_extension.json"
    if extension.is_file():
        target = _extended_size(extension, model_size)
        source = "vocab_extension.json"
    else:
        target = _tokenizer_size(tokenizer_dir)
        source = "tokenizer"
        if target > model_size and not grow:
            raise ConfigError(
                f"the tokenizer in {tokenizer_dir} has a {target:,}-token vocabulary but the model only "
                f"{model_size:,} embeddings, "
                f"and it is not an extension of the model's tokenizer (no vocab_extension.json): train from scratch "
                f"with this tokenizer, extend the model's own with `medfoundry tokenizer extend`, or request growth"
            )
    added = grow_embeddings(model, target) if target > model_size else []
    return {"source": source, "model_vocab_size": model_size, "vocab_size": vocab_size(model), "added_ids": added}


def _extended_size(path: Path, model_size: int) -> int:
    """The extended vocabulary size, after checking the model is the base (or already grown) and the new ids
    are appended."""
    try:
        extension = json.loads(path.read_text(encoding="utf-8"))
        base, size, added = extension["base_vocab_size"], extension["vocab_size"], extension["added_ids"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise InputError(str(path), f"not a vocabulary extension record ({exc})") from None
    if added != list(range(base, size)):
        raise InputError(str(path), f"added_ids are not the ids {base}..{size - 1} appended after the base vocabulary")
    if model_size not in (base, size):
        raise ConfigError(
            f"{path}: the tokenizer extends a {base:,}-token vocabulary to {size:,}, "
            f"but the model has {model_size:,} embeddings: it was not trained with the base tokenizer"
        )
    return size


def _tokenizer_size(tokenizer_dir: Path) -> int:
    from medfoundry.model.load import load_backend_tokenizer

    return load_backend_tokenizer(tokenizer_dir).get_vocab_size(with_added_tokens=True)
