"""Bits per byte: one definition for pretraining validation (``val_bpb``) and the eval stage's perplexity.

    bits per byte = (sum of the NLL, in nats, of the scored text tokens) / ln 2 / (UTF-8 bytes of their text)

which is lm-evaluation-harness's ``bits_per_byte`` (total NLL / ln 2 / total UTF-8 bytes of the text scored).
Special tokens (``<|endoftext|>``, BOS, padding, chat markers: :func:`special_ids`) are not text: a predicted
special token contributes neither bytes nor its loss. In the eval stage a document holds no special token
(texts are encoded without adding any; a shard document is the tokens between two EOS), so this is every
scored token over the document's bytes. A pretraining validation window of the packed stream predicts the
EOS that separates documents; counting that EOS's loss over the text's bytes alone would inflate the figure,
and counting its 13 decoded bytes (as ``decode`` without ``skip_special_tokens`` does) deflated it by about 1%
on abstracts. Excluding both makes a window holding one whole document (``[EOS] + doc + [EOS]``) score
exactly what the eval stage scores on that document. Token loss and perplexity (``val_loss``) keep every
target, special or not: they are the training objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LN2 = math.log(2)


def special_ids(tokenizer) -> np.ndarray:
    """Sorted ids of ``tokenizer``'s special tokens: its BOS/EOS/UNK/PAD/additional ones, and every added
    token marked special (chat-template markers)."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return np.array(sorted(i for i in ids if i is not None), dtype=np.int64)


def text_mask(ids: np.ndarray | Sequence[int], special: np.ndarray) -> np.ndarray:
    """True where ``ids`` holds a text token (not in ``special``)."""
    return ~np.isin(np.asarray(ids, dtype=np.int64), special)


def text_bytes(tokenizer, ids: np.ndarray | Sequence[int], special: np.ndarray | None = None) -> int:
    """UTF-8 bytes of the text of ``ids``: their decoding with the special tokens left out (``special``:
    :func:`special_ids`, computed when not given). Byte-level BPE (GPT-2's, medfoundry's) decodes to the
    original text; a run cut inside a multi-byte character decodes its partial bytes to U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64)
    kept = ids[text_mask(ids, special_ids(tokenizer) if special is None else special)]
    return len(tokenizer.decode(kept.tolist(), clean_up_tokenization_spaces=False).encode("utf-8"))


def bits_per_byte(nll: float, n_bytes: int) -> float | None:
    """``nll`` (nats, of the text tokens) over ``n_bytes`` UTF-8 bytes of their text, in bits; None without bytes."""
    return nll / LN2 / n_bytes if n_bytes else None
