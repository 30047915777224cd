"""Log-probabilities of chosen tokens and of their likeliest alternatives, computed on the logits' device.

They are the model's own distribution: ``log_softmax`` of the raw logits, before penalties, temperature,
top-k and top-p, as vLLM returns them by default (``logprobs_mode="raw_logprobs"``), so that a scorer gets
the same numbers whatever sampling the request asked for. :func:`pack` lays each row out as one float32
vector (the target's log-probability, the top ``k`` values, the top ``k`` ids) so that the caller reads a
whole step back in one transfer, together with the sampled tokens; token ids are exact in float32 below
2**24, far above any vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogprobOptions:
    """The log-probabilities a request returns, each with its ``k`` likeliest tokens (None: not asked).
    ``generated`` covers every generated token, ``prompt`` every prompt token (vLLM's ``logprobs`` and
    ``prompt_logprobs``)."""

    generated: int | None = None
    prompt: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``k`` likeliest tokens at its position, likeliest first. The first
    token of a prompt has none (``logprob`` None, ``top`` empty): nothing before it predicts it."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def pack(logprobs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Rows ``[logprob of target, k top values, k top ids]`` (float32) of ``logprobs`` (rows, vocab)."""
    chosen = logprobs.gather(1, targets[:, None].long())
    if k == 0:
        return chosen
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return torch.cat([chosen, values, ids.float()], dim=1)


def unpack(row: list[float], token: int, k: int) -> TokenLogprob:
    """A row of :func:`pack` (made with the batch's largest ``k``) read back for a request that asked for ``k``."""
    width = (len(row) - 1) // 2
    top = tuple(zip((int(i) for i in row[1 + width : 1 + width + k]), row[1 : 1 + k]))
    return TokenLogprob(token, row[0], top)
