"""Text generation for chain-of-thought evaluation, through Hugging Face ``generate``.

The interface is deliberately small (prompts in, completions out) so that the project's own
KV-cache engine can replace it. What it guarantees:

* a completion depends on its prompt and the seed only, never on its batch mates: prompts are
  left-padded, and sampling draws each row from its own generator, seeded from (seed, sample
  number, prompt text), so batch size, ``limit`` and order change nothing;
* greedy decoding with ``temperature == 0``; ``n`` greedy samples are one completion repeated;
* completions stop at EOS, at ``max_new_tokens`` or at the first stop sequence, which is cut off.

Sampling is done by a logits processor that turns each row's distribution (temperature, then
nucleus ``top_p``) into a one-hot choice which greedy decoding then takes: Hugging Face's own
sampler draws from one global generator for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash
from transformers import StoppingCriteria

DEFAULT_BATCH = 8


class StopOnText(StoppingCriteria):
    """Stops a row once its completion contains a stop sequence. Decoding the completion each step is
    cheap and, unlike ``stop_strings``, needs no per-call preprocessing of the whole vocabulary."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.width = tokenizer, [s for s in stop if s], prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


class SeededSampler:
    """A ``LogitsProcessor`` sampling row ``i`` with generator ``i`` (temperature, then top-p)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        chosen = [self._draw(row, gen) for row, gen in zip(probs, self.generators)]
        onehot = torch.full_like(scores, float("-inf"))
        onehot[torch.arange(len(chosen)), torch.tensor(chosen, device=scores.device)] = 0.0
        return onehot

    def _draw(self, probs: torch.Tensor, generator: torch.Generator) -> int:
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < self.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))


def row_seed(seed: int, sample: int, prompt: str) -> int:
    return xxhash.xxh64_intdigest(f"{seed}\0{sample}\0{prompt}".encode()) & (2**63 - 1)


def generate(
    lm,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    stop: Sequence[str] = (),
    batch_size: int | None = None,
    add_special_tokens: bool = True,
) -> list[list[str]]:
    """``n`` completions of each prompt (``lm``: a :class:`medfoundry.model.load.LoadedModel`)."""
    draws = 1 if temperature == 0 else n
    rows = [(i, j) for i in range(len(prompts)) for j in range(draws)]
    encoded = _encode(lm, prompts, max_new_tokens, add_special_tokens)
    rows.sort(key=lambda r: -len(encoded[r[0]]))  # similar lengths together: little padding
    texts: dict[tuple[int, int], str] = {}
    size = batch_size or DEFAULT_BATCH
    for start in range(0, len(rows), size):
        batch = rows[start : start + size]
        seeds = [row_seed(seed, j, prompts[i]) for i, j in batch]
        outs = _generate_batch(lm, [encoded[i] for i, _ in batch], seeds, max_new_tokens, temperature, top_p, stop)
        texts.update(zip(batch, (_cut(text, stop) for text in outs)))
    return [[texts[(i, j if draws > 1 else 0)] for j in range(n)] for i in range(len(prompts))]


def _encode(lm, prompts: Sequence[str], max_new_tokens: int, add_special_tokens: bool) -> list[list[int]]:
    """Token ids per prompt, cut from the left so that prompt and completion fit the context."""
    keep = max(1, lm.max_length - max_new_tokens)
    ids = lm.tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return [row[-keep:] for row in ids]


@torch.inference_mode()
def _generate_batch(
    lm,
    ids: list[list[int]],
    seeds: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str],
) -> list[str]:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    tokenizer, model = lm.tokenizer, lm.model
    eos = (
        model.generation_config.eos_token_id
        if model.generation_config.eos_token_id is not None
        else tokenizer.eos_token_id
    )
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    )  # masked anyway
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    processors = LogitsProcessorList([SeededSampler(seeds, temperature, top_p)] if temperature > 0 else [])
    stopping = StoppingCriteriaList([StopOnText(tokenizer, stop, width)] if any(stop) else [])
    device = next(model.parameters()).device
    with lm.autocast():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=stopping,
        )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def _cut(text: str, stop: Sequence[str]) -> str:
    """The completion up to the first stop sequence."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text
