"""Turning a stream of tokens into a stream of text: whole characters only, stop sequences never half-shown.

Byte-level BPE (GPT-2, LLaMA 3, SmolLM) splits a multi-byte character across tokens, so decoding one
token at a time would print replacement characters; SentencePiece-style decoders drop the leading space
of a text's first word, so decoding tokens alone would glue words together. :class:`Detokenizer`
decodes a short window that starts a few tokens back and emits the part that grew, holding back text
that ends in an incomplete character (the approach of Hugging Face's text-generation-inference).
:class:`StopMatcher` holds back any tail that could be the start of a stop sequence, so a stop sequence
split across tokens is cut out whole and the client never sees a piece of it.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first generated ones, so spacing comes out right
_INCOMPLETE = "\ufffd"


class Detokenizer:
    """Incremental decoding of one request's generated tokens (special tokens are skipped)."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before this one have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; return the new complete text (possibly empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of the generation (an incomplete character stays a U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Cuts the text at the first stop sequence; holds back a tail that may still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop sequence was found). After a stop, nothing
        more should be pushed: the text from the stop sequence on is dropped."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            emit, self.pending = self.pending[: min(hits)], ""
            return emit, True
        keep = self._partial_tail()
        emit, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return emit, False

    def flush(self) -> str:
        """The held-back tail, at the end of a generation that did not stop on a sequence."""
        tail, self.pending = self.pending, ""
        return tail

    def _partial_tail(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop sequence."""
        for size in range(min(len(self.pending), max(map(len, self.stops)) - 1), 0, -1):
            tail = self.pending[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
