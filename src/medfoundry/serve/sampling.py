"""Choosing the next token from the last logits: penalties, temperature, top-k, top-p, seeded draws.

Each request carries its own :class:`TokenSampler` (its parameters, a seeded ``torch.Generator`` and
the token counts its penalties need) and every row is transformed on its own, so a seeded request
draws the same tokens whether it runs alone or next to others. A batch in which every row is greedy
without penalties (the common case of benchmarks and evaluation) is one ``argmax``.

Conventions follow the OpenAI API and vLLM: ``temperature`` 0 (or below 1e-5) is greedy; ``frequency_penalty`` and
``presence_penalty`` (-2..2) subtract from the logits of tokens already *generated*;
``repetition_penalty`` (Keskar et al., as in ``transformers``: divide positive logits, multiply
negative ones) covers the prompt's tokens too; ``top_k`` 0 (or -1) and ``top_p`` 1 disable those filters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max
GREEDY_BELOW = 1e-5  # a smaller temperature is greedy (as in vLLM): dividing logits by it overflows to inf, then NaN


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates; invalid values raise ``ValueError`` naming the field (the server's 400)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "top_k", max(self.top_k, 0))  # vLLM's -1 means "off", like 0
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 = off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
        ]
        for ok, field, rule in checks:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r}: {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


class TokenSampler:
    """One request's sampling state. Without a seed, a random one is drawn (and kept in ``seed``). The
    penalties' vocabulary-sized tensors are built when first needed, not while the request waits."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int):
        self.params = params
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.prompt_ids, self.vocab_size = prompt_ids, vocab_size
        self.seen: torch.Tensor | None = None  # prompt and generated tokens, for the repetition penalty
        self.counts: torch.Tensor | None = None  # generated tokens, for frequency and presence penalties

    def observe(self, token: int) -> None:
        """Record a generated token for the penalties."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def penalize(self, logits: torch.Tensor) -> None:
        """Apply this request's penalties to its row of float32 logits, in place."""
        p = self.params
        if p.repetition_penalty != 1:
            if self.seen is None:
                self.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
                self.seen[torch.tensor(self.prompt_ids, dtype=torch.long)] = True
            picked = logits[self.seen]
            logits[self.seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            if self.counts is None:
                self.counts = torch.zeros(self.vocab_size)
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()

    def draw(self, logits: torch.Tensor) -> int:
        """Sample from one (penalized) row: temperature, then top-k, then top-p among what is left."""
        p = self.params
        # extreme penalties (a repetition_penalty of 1e-300 divides logits into inf) would make softmax NaN: at the
        # float32 limit instead, the tokens they push to the top share the draw and the rest get nothing
        logits = (logits / p.temperature).clamp(-FLOAT32_MAX, FLOAT32_MAX)
        if p.top_k and p.top_k < logits.shape[-1]:
            values, indices = torch.topk(logits, p.top_k)
        else:
            values, indices = torch.sort(logits, descending=True) if p.top_p < 1 else (logits, None)
        probs = torch.softmax(values, dim=-1)
        if p.top_p < 1:  # keep the smallest prefix of the sorted tokens whose mass reaches top_p
            beyond = torch.cumsum(probs, dim=-1) - probs >= p.top_p
            beyond[0] = False  # the likeliest token always stays (a top_p below float32's smallest is 0 here)
            probs = probs.masked_fill(beyond, 0.0)
        choice = int(torch.multinomial(probs, 1, generator=self.generator))
        return int(indices[choice]) if indices is not None else choice


def sample(logits: torch.Tensor, samplers: list[TokenSampler]) -> list[int]:
    """The next token of each row of ``logits`` (rows, vocab), row ``i`` chosen by ``samplers[i]``."""
    logits = logits.float()
    if not any(s.params.penalized or not s.params.greedy for s in samplers):
        return logits.argmax(dim=-1).tolist()
    tokens = []
    for row, sampler in zip(logits, samplers):
        sampler.penalize(row)
        tokens.append(int(row.argmax()) if sampler.params.greedy else sampler.draw(row))
    return tokens
