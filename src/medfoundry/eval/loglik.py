"""Log-likelihood of multiple-choice continuations, token for token as lm-eval's HFLM scores them.

The tokens are lm-eval's (``HFLM`` of lm-eval 0.4.13, causal models, default arguments):

* trailing whitespace of the context moves onto the continuation; the continuation's tokens are
  ``encode(context + continuation)`` minus the first ``len(encode(context))`` tokens, and the model
  sees ``encode(context)`` followed by them (the tokens of the whole string are not used as such);
* strings are encoded with the tokenizer's own special-token setting (a BOS only where its post-processor
  adds one), except strings that already start with the BOS text, which get none;
* an empty context becomes the BOS token (EOS when there is none), unless the continuation itself
  starts with that token, which then serves as the context;
* an input longer than the context window keeps its last ``max_length + 1`` tokens, less the last
  one (the model never needs to read the final continuation token).

What makes it fast:

* every distinct context is run once; the tokens of a multi-token continuation beyond its first run on
  the context's KV cache, expanded over the choices; when all continuations are single tokens
  (" A".." D", " yes"/" no") nothing but the context is run;
* contexts that begin with the same tokens (few-shot exemplars, a task description) share them: that
  prefix is run once and its KV cache serves the whole group, so k-shot costs little more than zero-shot;
* the output layer and the log-softmax are applied only at positions whose next token is scored, never
  to the whole ``[sequence x vocabulary]``;
* contexts are sorted by length and batched under a token budget, right-padded with attention masks, so
  no position shifts and a score does not depend on its batch.

The model runs in its own dtype (bf16 weights for ``precision="bf16"``); the output layer and the
log-softmax always run in float32 (bf16 logits, as lm-eval's, quantize log-probabilities and tie close choices).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medfoundry.errors import ConfigError
from medfoundry.eval.device import upload

# Activations per forward pass when batch_size is None (padded tokens x hidden size): batches grow until
# their activations would leave the CPU caches, where small models stop paying per-call overhead and large
# ones start paying for memory traffic (measurements: docs/evaluation-speed.md).
ACTIVATION_BUDGET = 512 * 576
# On CPU, eager attention (two dense bf16 matmuls and a softmax) beats SDPA's flash kernel while the keys are
# few, since the flash kernel's tiling only pays on long rows (docs/evaluation-speed.md).
EAGER_MAX_KEYS_CPU = 768
# Tokens of KV cache a batch may hold (the shared prefix and the context, expanded over continuation rows)
CACHE_BUDGET = 8192
# Contexts sharing at least this many leading tokens run them once (one extra forward pass per group)
MIN_SHARED = 16


@dataclass(frozen=True)
class LoglikRequest:
    context: str
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class ChoiceScore:
    loglik: float  # sum of the log-probabilities of the continuation tokens
    is_greedy: bool  # every continuation token is the argmax of its distribution
    tokens: int  # number of continuation tokens


Tokens = tuple[int, ...]


@dataclass
class _Unit:
    """A distinct model input prefix and the distinct continuations scored after it."""

    prefix: Tokens
    continuations: list[Tokens]


def score_requests(
    lm, requests: Sequence[LoglikRequest], *, batch_size: int | None = None, progress: bool = False
) -> list[list[ChoiceScore]]:
    """Score every continuation of every request: ``result[i][j]`` belongs to ``requests[i].continuations[j]``.

    ``lm`` is a :class:`medfoundry.model.load.LoadedModel`. ``batch_size`` is the number of contexts
    per forward pass; None sizes batches by a token budget. Results do not depend on it.
    """
    return _score(lm, encode_requests(lm.tokenizer, requests, lm.max_length), batch_size, progress)


def score_token_pairs(
    lm, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int | None = None, progress: bool = False
) -> list[ChoiceScore]:
    """Score already tokenized (context, continuation) pairs, HFLM's ``_loglikelihood_tokens`` input, for callers
    that tokenize with their own rules (the lm-eval backend's requests and rolling windows); inputs longer than the
    context window are cut as in :func:`encode_requests`. Pairs sharing a context share its forward pass."""
    windows = [[_window(list(c), list(t), lm.max_length, i)] for i, (c, t) in enumerate(pairs)]
    return [scores[0] for scores in _score(lm, windows, batch_size, progress)]


def _score(
    lm, pairs: list[list[tuple[Tokens, Tokens]]], batch_size: int | None, progress: bool
) -> list[list[ChoiceScore]]:
    from tqdm import tqdm

    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    budget = max(1, ACTIVATION_BUDGET // lm.model.config.hidden_size)
    plan = [
        (shared, batch)
        for shared, members in _groups(_units(pairs))
        for batch in _batches(members, len(shared), batch_size, budget)
    ]
    scorer = _Scorer(lm)
    scores: dict[tuple[Tokens, Tokens], ChoiceScore] = {}
    try:
        with torch.inference_mode():
            for shared, batch in tqdm(plan, desc="loglikelihood", unit="batch", disable=not progress):
                scores.update(scorer.score(batch, shared))
    finally:
        scorer.restore_attention()
    return [[scores[pair] for pair in request] for request in pairs]


# --- tokenization ------------------------------------------------------------------------------------


def encode_requests(tokenizer, requests: Sequence[LoglikRequest], max_length: int) -> list[list[tuple[Tokens, Tokens]]]:
    """(model prefix, continuation tokens) for every continuation, with HFLM's rules (module docstring).

    All strings go through the Rust tokenizer in at most three batched calls.
    """
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoder = _Encoder(tokenizer, prefix_id)
    for request in requests:
        if request.context:
            context = request.context.rstrip()
            spaces = request.context[len(context) :]
            encoder.add(context, *(context + spaces + c for c in request.continuations))
        else:
            encoder.add_bare(*request.continuations)
    encoder.run()
    return [
        [_window(*_pair(encoder, request, c, prefix_id), max_length, i) for c in request.continuations]
        for i, request in enumerate(requests)
    ]


class _Encoder:
    """Collects strings, then encodes each distinct one once, grouped by special-token setting."""

    def __init__(self, tokenizer, prefix_id: int | None):
        self.tokenizer = tokenizer
        # HFLM compares against decode(prefix_token_id), special tokens kept
        self.bos_text = tokenizer.decode([prefix_id]) if prefix_id is not None else None
        # keyed like HFLM's add_special_tokens argument: None = the tokenizer's default, False = none
        self.pending: dict[bool | None, set[str]] = {None: set(), False: set()}
        self.ids: dict[tuple[str, bool | None], list[int]] = {}

    def add(self, *strings: str) -> None:
        """Strings encoded as HFLM's ``tok_encode(string)`` does."""
        self.pending[None].update(strings)

    def add_bare(self, *strings: str) -> None:
        """Strings encoded without special tokens (continuations of an empty context)."""
        self.pending[False].update(strings)

    def get(self, string: str, bare: bool = False) -> list[int]:
        return self.ids[(string, False if bare else None)]

    def run(self) -> None:
        plain = {s for s in self.pending[None] if not (self.bos_text and s.startswith(self.bos_text))}
        groups = [
            (None, plain, {}),
            (None, self.pending[None] - plain, {"add_special_tokens": False}),
            (False, self.pending[False], {"add_special_tokens": False}),
        ]
        for key, strings, kwargs in groups:
            strings = sorted(strings)
            if strings:
                encoded = self.tokenizer(strings, **kwargs)["input_ids"]
                self.ids.update(((s, key), ids) for s, ids in zip(strings, encoded))


def _pair(
    encoder: _Encoder, request: LoglikRequest, continuation: str, prefix_id: int | None
) -> tuple[list[int], list[int]]:
    """HFLM's (context_enc, continuation_enc) of one continuation."""
    if not request.context:
        tokens = encoder.get(continuation, bare=True)
        if prefix_id is None:
            raise ConfigError("an empty context is scored after the BOS or EOS token; the tokenizer has neither")
        if tokens and tokens[0] == prefix_id:
            return tokens[:1], tokens[1:]
        return [prefix_id], tokens
    context = request.context.rstrip()
    spaces = request.context[len(context) :]
    context_ids = encoder.get(context)
    return context_ids, encoder.get(context + spaces + continuation)[len(context_ids) :]


def _window(context: list[int], continuation: list[int], max_length: int, index: int) -> tuple[Tokens, Tokens]:
    """The model prefix of lm-eval's left-truncated input, ``(context + continuation)[-(max_length + 1):][:-1]``,
    less the continuation tokens (which are fed from the cache)."""
    if not context:
        raise ValueError(f"request {index}: the context tokenizes to nothing (it is only whitespace)")
    if not continuation:
        raise ValueError(f"request {index}: a continuation tokenizes to nothing")
    if len(continuation) > max_length:
        raise ValueError(
            f"request {index}: a continuation of {len(continuation)} tokens exceeds the model's context of {max_length}"
        )
    start = max(0, len(context) + len(continuation) - max_length - 1)
    return tuple(context[start:]), tuple(continuation)


# --- batching -----------------------------------------------------------------------------------------


def _units(pairs: list[list[tuple[Tokens, Tokens]]]) -> list[_Unit]:
    """One unit per distinct prefix (normally one per request), each continuation once."""
    units: dict[Tokens, _Unit] = {}
    for request in pairs:
        for prefix, continuation in request:
            unit = units.setdefault(prefix, _Unit(prefix, []))
            if continuation not in unit.continuations:
                unit.continuations.append(continuation)
    return list(units.values())


def _groups(units: list[_Unit]) -> list[tuple[Tokens, list[_Unit]]]:
    """(shared leading tokens, units): contexts sharing at least ``MIN_SHARED`` leading tokens form a group,
    the others one group sharing nothing.

    In lexicographic order a group's common prefix is that of its first and last context; every context
    keeps at least one token of its own, so its last position is computed in its own pass.
    """
    groups: list[tuple[int, list[_Unit]]] = []
    for unit in sorted(units, key=lambda u: u.prefix):
        if groups:
            length, members = groups[-1]
            common = min(length, _common_length(members[0].prefix, unit.prefix), len(unit.prefix) - 1)
            if common >= MIN_SHARED:
                members.append(unit)
                groups[-1] = (common, members)
                continue
        groups.append((len(unit.prefix) - 1, [unit]))
    alone = [members[0] for _, members in groups if len(members) == 1]
    shared = [(members[0].prefix[:length], members) for length, members in groups if len(members) > 1]
    return shared + ([((), alone)] if alone else [])


def _common_length(a: Tokens, b: Tokens) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _batches(units: list[_Unit], offset: int, batch_size: int | None, budget: int) -> list[list[_Unit]]:
    """Longest first, so the first unit sets a batch's padded width and similar lengths share a batch.

    ``offset`` leading tokens are shared (already in the cache). Without ``batch_size``, a batch grows while
    the tokens it runs stay within ``budget`` and the KV cache it holds within ``CACHE_BUDGET``.
    """
    ordered = sorted(units, key=lambda u: (-len(u.prefix), u.prefix))
    if batch_size is not None:
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    batches: list[list[_Unit]] = []
    for unit in ordered:
        if batches and _fits(batches[-1] + [unit], offset, budget):
            batches[-1].append(unit)
        else:
            batches.append([unit])
    return batches


def _fits(batch: list[_Unit], offset: int, budget: int) -> bool:
    width = max(len(u.prefix) for u in batch) - offset
    rows = [len(c) - 1 for u in batch for c in u.continuations if len(c) > 1]
    extra = max(rows, default=0)
    run = max(width * len(batch), len(rows) * extra)
    cache = max(len(batch), len(rows)) * (offset + width + extra)
    return run <= budget and cache <= CACHE_BUDGET


# --- the model ----------------------------------------------------------------------------------------


class _Scorer:
    """Runs the base model (hidden states) and applies the output layer only where needed."""

    def __init__(self, lm):
        self.device = torch.device(lm.device)
        self.base = lm.model.base_model
        head = lm.model.get_output_embeddings()
        _check_head(lm.model, self.base, head, self.device)
        # The output layer runs in float32 (a copy of its weight for bf16 models): bf16 logits would
        # quantize the log-probabilities (steps of 1/16 nat and more) and tie choices that differ.
        self.head_weight = head.weight.float()
        self.head_bias = head.bias.float() if head.bias is not None else None
        # BLOOM (ALiBi) has no position ids: it derives positions from the attention mask
        self.takes_positions = "position_ids" in inspect.signature(self.base.forward).parameters
        self.model = lm.model
        self.attention = lm.model.config._attn_implementation
        # only SDPA models on CPU switch (BLOOM has its own attention, GPU kernels are another matter)
        self.switch_attention = self.attention == "sdpa" and self.device.type == "cpu"
        self.shared_tokens: Tokens | None = None  # the shared prefix whose KV cache is kept
        self.shared_kv = None

    def score(self, batch: list[_Unit], shared: Tokens) -> dict[tuple[Tokens, Tokens], ChoiceScore]:
        """Scores of every continuation of ``batch``, whose contexts all begin with ``shared``."""
        multi = [(i, c) for i, u in enumerate(batch) for c in u.continuations if len(c) > 1]
        keys = max(len(u.prefix) for u in batch) + max((len(c) for _, c in multi), default=0)
        self._set_attention("eager" if keys <= EAGER_MAX_KEYS_CPU else "sdpa")
        choices = [(i, c) for i, u in enumerate(batch) for c in u.continuations]
        picked = upload([[i for i, _ in choices], [c[0] for _, c in choices]], self.device)
        last, cache, mask = self._contexts(batch, shared, keep_cache=bool(multi))
        first = self._log_probs(last)  # the first continuation token of every choice, [contexts, vocab]
        # only the scored numbers leave the device, all of the batch's in one transfer (one wait for a GPU)
        parts = [first[picked[0], picked[1]].double(), (first.argmax(-1)[picked[0]] == picked[1]).double()]
        if multi:
            parts += self._rest(cache, mask, multi)
        host = torch.cat(parts).cpu()
        first_logp, first_greedy = host[: len(choices)].tolist(), host[len(choices) : 2 * len(choices)].tolist()
        rest = self._rest_scores(host[2 * len(choices) :], multi) if multi else {}
        scores = {}
        for (i, c), logp, greedy_first in zip(choices, first_logp, first_greedy):
            loglik, greedy = rest.get((i, c), (0.0, True))
            scores[(batch[i].prefix, c)] = ChoiceScore(
                loglik=logp + loglik, is_greedy=greedy and bool(greedy_first), tokens=len(c)
            )
        return scores

    def _contexts(self, batch: list[_Unit], shared: Tokens, keep_cache: bool):
        """Run the contexts (after ``shared``, read from its cache): the hidden state of each context's last
        token, the KV cache when ``keep_cache``, and the attention mask over the cache."""
        offset = len(shared)
        ids, mask = self._pad([u.prefix[offset:] for u in batch])
        kwargs = {}
        if offset:
            kwargs["cache"] = self._shared_cache(shared, len(batch))
            if self.takes_positions:
                kwargs["position_ids"] = offset + torch.arange(ids.shape[1], device=self.device).expand_as(ids)
            mask = torch.cat([mask.new_ones(len(batch), offset), mask], dim=1)
        out = self.base(input_ids=ids, attention_mask=mask, use_cache=keep_cache or bool(offset), **kwargs)
        last = out.last_hidden_state[torch.arange(len(batch), device=self.device), mask.sum(1) - offset - 1]
        return last, out.cache, mask

    def _rest(self, cache, mask: torch.Tensor, multi: list[tuple[int, Tokens]]) -> list[torch.Tensor]:
        """Log-probabilities (float64) and greediness (1.0 or 0.0) of continuation tokens 2..n, on the device, one
        row per multi-token continuation, each row reading its context from the cache (expanded over the rows)."""
        rows = upload([i for i, _ in multi], self.device)
        tails = [c[:-1] for _, c in multi]
        width = max(map(len, tails))
        # the positions of the tails' tokens, row-major (what boolean indexing with the mask yields, without
        # waiting for the device to count them)
        kept = upload([r * width + j for r, tail in enumerate(tails) for j in range(len(tail))], self.device)
        targets = upload([t for _, c in multi for t in c[1:]], self.device)
        cache.reorder_cache(rows)
        ids, cont_mask = self._pad(tails)
        kwargs = {"attention_mask": torch.cat([mask[rows], cont_mask], dim=1), "cache": cache}
        if self.takes_positions:  # padding gets position 0: a real position could lie beyond the table
            start = mask.sum(1)[rows, None]
            kwargs["position_ids"] = (start + torch.arange(ids.shape[1], device=self.device)) * cont_mask
        hidden = self.base(input_ids=ids, **kwargs).last_hidden_state.flatten(0, 1)[kept]
        logp = self._log_probs(hidden)
        token_logp = logp.gather(1, targets[:, None])[:, 0].double()  # summed without float32 rounding
        return [token_logp, (logp.argmax(-1) == targets).double()]

    @staticmethod
    def _rest_scores(
        host: torch.Tensor, multi: list[tuple[int, Tokens]]
    ) -> dict[tuple[int, Tokens], tuple[float, bool]]:
        """Per multi-token continuation, the summed log-probability and greediness of its tokens 2..n, from
        :meth:`_rest`'s tensors read back to the host."""
        token_logp, hits = host.chunk(2)
        result, start = {}, 0
        for key in multi:
            end = start + len(key[1]) - 1
            result[key] = (float(token_logp[start:end].sum()), bool(hits[start:end].all()))
            start = end
        return result

    def _set_attention(self, kernel: str) -> None:
        if self.switch_attention and self.model.config._attn_implementation != kernel:
            self.model.set_attn_implementation(kernel)

    def restore_attention(self) -> None:
        """The model is shared with other stages: give it back with the kernel it came with."""
        self._set_attention(self.attention)

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(F.linear(hidden.float(), self.head_weight, self.head_bias), dim=-1)

    def _shared_cache(self, shared: Tokens, rows: int):
        """The KV cache of ``shared``, computed once per group, copied and expanded to ``rows``."""
        if self.shared_tokens != shared:
            ids = upload([shared], self.device)
            self.shared_tokens, self.shared_kv = shared, self.base(input_ids=ids, use_cache=True).cache
        cache = copy.deepcopy(self.shared_kv)
        cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=self.device))
        return cache

    def _pad(self, sequences: list[Tokens]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (padding id 0: never attended to) and the attention mask."""
        width = max(len(s) for s in sequences)
        ids = [[*seq, *[0] * (width - len(seq))] for seq in sequences]
        mask = [[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences]
        return upload(ids, self.device), upload(mask, self.device)


def _check_head(model, base, head, device: torch.device) -> None:
    """The scorer computes logits as ``head(base(x))`` with a linear ``head``; refuse models whose forward
    does more (soft-capping, logit scaling), which would otherwise be scored silently wrong."""
    ids = torch.arange(4, device=device)[None] % model.config.vocab_size
    split = None
    if isinstance(head, torch.nn.Linear):
        with torch.inference_mode():
            full = model(input_ids=ids, use_cache=False).logits.float()
            split = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
    if split is None or not torch.allclose(full, split, rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"{type(model).__name__}: its logits are not its output layer applied to the last hidden "
            "state (e.g. soft-capping or scaling), which the log-likelihood scorer relies on"
        )
