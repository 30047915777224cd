"""Choosing the next token from the last logits: penalties, temperature, top-k, top-p, seeded draws.

Each request carries its own :class:`TokenSampler` (its :class:`~medfoundry.generation.config.SamplingConfig`,
a seeded ``torch.Generator`` and the token counts its penalties need) and every row is transformed on its own,
so a seeded request draws the same tokens whether it runs alone or next to others. A batch in which every row
is greedy without penalties (the common case of benchmarks and evaluation) is one ``argmax``.

The repetition penalty is Keskar et al.'s, as in ``transformers``: divide positive logits, multiply negative
ones; the frequency and presence penalties subtract from the logits of tokens already *generated*.

Everything lives on the logits' device: the penalties' tensors are created there, and draws use a generator of
that device, seeded with the request's seed at its first draw (a CUDA generator's stream differs from the CPU
one's, so a seed gives other tokens on a GPU than on the CPU, the same ones on every run of that GPU). No step
reads a value back to the host until :func:`sample` returns the chosen tokens, all rows in one transfer.
"""

from __future__ import annotations

import random

import torch

from medfoundry.generation.config import SamplingConfig

FLOAT32_MAX = torch.finfo(torch.float32).max


class TokenSampler:
    """One request's sampling state. Without a seed, a random one is drawn (and kept in ``seed``). The
    penalties' vocabulary-sized tensors and the generator are built on the logits' device when first needed,
    not while the request waits."""

    def __init__(self, params: SamplingConfig, prompt_ids: list[int], vocab_size: int):
        self.params = params
        self.greedy, self.penalized = params.greedy, params.penalized  # read at every step
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator: torch.Generator | None = None  # on the logits' device, seeded with ``seed``, at the first draw
        self.prompt_ids, self.vocab_size = prompt_ids, vocab_size
        self.seen: torch.Tensor | None = None  # prompt and generated tokens, for the repetition penalty
        self.counts: torch.Tensor | None = None  # generated tokens, for frequency and presence penalties

    def observe(self, token: int) -> None:
        """Record a generated token for the penalties (on their device: no host synchronization)."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def penalize(self, logits: torch.Tensor) -> None:
        """Apply this request's penalties to its row of float32 logits, in place."""
        p = self.params
        device = logits.device
        if p.repetition_penalty != 1:
            if self.seen is None:
                self.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
                self.seen[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
            # over the whole row rather than ``logits[self.seen]``: boolean indexing waits for the GPU (its size)
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits.copy_(torch.where(self.seen, penalized, logits))
        if p.frequency_penalty or p.presence_penalty:
            if self.counts is None:
                self.counts = torch.zeros(self.vocab_size, device=device)
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample from one (penalized) row: temperature, then top-k, then top-p among what is left. The token is
        returned as a one-element tensor on the logits' device (reading it is the caller's one synchronization)."""
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
        choice = torch.multinomial(probs, 1, generator=self.generator_for(probs.device))
        # indexed with the one-element tensor, not a 0-d one: that one Python would read as an int, from the GPU
        return indices[choice] if indices is not None else choice

    def generator_for(self, device: torch.device) -> torch.Generator:
        """This request's generator, on ``device`` (``torch.multinomial`` refuses a generator of another device).
        Made and seeded at the first draw; a request never changes device, were it to, its stream restarts."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


def sample(logits: torch.Tensor, samplers: list[TokenSampler]) -> list[int]:
    """The next token of each row of ``logits`` (rows, vocab), row ``i`` chosen by ``samplers[i]``. The rows are
    chosen on the logits' device and read back together: one host synchronization per call."""
    return choose(logits, samplers).tolist()


def choose(logits: torch.Tensor, samplers: list[TokenSampler]) -> torch.Tensor:
    """:func:`sample`'s tokens, left on the logits' device (rows,), for a caller that reads more back with them.
    Penalties are applied to float32 logits in place: to ``logits`` themselves when they are float32."""
    logits = logits.float()
    if not any(s.penalized or not s.greedy for s in samplers):
        return logits.argmax(dim=-1)
    tokens = []
    for row, sampler in zip(logits, samplers):
        sampler.penalize(row)
        tokens.append(row.argmax(dim=-1, keepdim=True) if sampler.greedy else sampler.draw(row))
    return torch.cat(tokens)
