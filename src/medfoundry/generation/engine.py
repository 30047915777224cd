"""The generation engine: continuous batching over a preallocated per-slot KV cache.

Requests wait in a queue; at every step boundary the engine admits as many as there are free slots
(one batched prefill, prompts right-padded, logits computed only at each prompt's last position), then
runs one decode step for every running request (one token each, at its own position, see
:mod:`medfoundry.generation.cache`). A prompt longer than :data:`PREFILL_CHUNK` tokens is prefilled in pieces of
that many, one piece per step, written into its row after the earlier ones: the running requests decode a token at
every one of those steps instead of waiting for the whole prompt. The decode step may be compiled
(:mod:`medfoundry.generation.compiled`); prefill is not. A request that finishes leaves at once and its slot goes
to the next one waiting. Each step returns, per request, the new text (whole characters, stop sequences cut out),
the new token and, at the end, why it finished, so callers can stream.

A request may ask for log-probabilities (:mod:`medfoundry.generation.logprobs`): of each generated token, read
back with the step's tokens in one transfer, and of its prompt (to score it, as ``echo`` does). A prompt to
score is prefilled in pieces whatever its length, so that only one piece's logits (piece x vocabulary) exist at a
time; its scores are read back in one transfer after the last piece.

Where the speed over ``model.generate`` comes from: no generation-mixin machinery per step (logits
processors, stopping criteria, input preparation), a cache written in place instead of grown by
concatenation, the LM head applied to the last position only, sampling on those logits only, a prompt the engine
already holds (the ``n`` samples of a question) copied from its row instead of prefilled again, bf16 weights where
the hardware computes in bf16, and on a CPU the decode step's linears in a kernel that reads the weights once for
all rows (:mod:`medfoundry.generation.cpu_linear`; ``few_row_linears=False`` keeps torch's) and, for a bf16 model,
its attention in fp32, several times faster there (:mod:`medfoundry.generation.cpu_attention`). Greedy output is
token for token that of ``model.generate(do_sample=False)`` in float32: the model's own forward runs on the same
tokens and positions; only the cache bookkeeping differs, and the order of the decode linears' sums on a CPU.

The engine is single-threaded by design: one thread calls :meth:`Engine.step` (the server's worker,
or :meth:`Engine.generate` / :meth:`Engine.stream` for direct use); :meth:`Engine.add_request`,
:meth:`Engine.cancel` and the tokenizing methods may be called from any thread. Tokenizing a prompt never
waits for a step, nor a step for it: a long prompt tokenized on another thread does not pause generation.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medfoundry.errors import ConfigError
from medfoundry.generation import cpu_attention, cpu_linear
from medfoundry.generation.cache import SlotCache
from medfoundry.generation.compiled import (
    batch_bucket,
    compile_decode,
    kv_bucket,
    mark_dynamic_sizes,
    should_compile,
)
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.logprobs import LogprobOptions, TokenLogprob, pack, unpack
from medfoundry.generation.sampling import TokenSampler, choose, sample
from medfoundry.generation.text import Detokenizer, StopMatcher

DEFAULT_MAX_SEQ_LEN = 2048  # per-slot cache length unless asked otherwise (SmolLM2's 8,192 would cost 4x the memory)
PREFILL_TOKEN_BUDGET = 4096  # padded prompt tokens per batched prefill of short prompts: many are split over steps
PREFILL_CHUNK = 512  # prompt tokens per piece of a long (or scored) prompt, one piece per step: (512, vocab) logits
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


@dataclass
class Output:
    """What one step produced for one request."""

    request_id: str
    text: str  # new text since the previous output of this request
    token_ids: list[int]  # new tokens (an end-of-sequence token counts, but adds no text)
    finish_reason: str | None  # None while running; then "stop", "length", "abort" (or the reason given to cancel)
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, in the first output, when asked


@dataclass
class Completion:
    """A finished generation, as returned by :meth:`Engine.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


@dataclass(eq=False)
class Request:
    """One generation in the engine; hold it to cancel it."""

    id: str
    prompt_ids: list[int]
    params: SamplingConfig
    sampler: TokenSampler
    detokenizer: Detokenizer
    stopper: StopMatcher
    logprobs: LogprobOptions = field(default_factory=LogprobOptions)
    output_ids: list[int] = field(default_factory=list)
    row: int = -1  # slot while running
    pos: int = 0  # tokens in the cache
    last: int = 0  # the latest token, fed at the next decode step
    finish_reason: str | None = None
    cancelled: str | None = None  # the finish reason it ends with at the next step ("abort", "timeout"...)
    arrived: float = field(default_factory=time.monotonic)
    prompt_scores: list[torch.Tensor] = field(default_factory=list)  # packed log-probabilities of the pieces so far
    prompt_logits: torch.Tensor | None = None  # (vocab,) at the prompt's last token, while it runs: see _prefill_batch

    @functools.cached_property
    def prompt_key(self) -> tuple[int, ...]:
        """The prompt as a dictionary key (see :meth:`Engine._prefill_batch`): made once per request."""
        return tuple(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        """Holding a row while its prompt is prefilled piece by piece (``pos``: the prompt tokens in the cache)."""
        return self.row >= 0 and self.pos < len(self.prompt_ids)


class Engine:
    """Generates for many requests at once with one Hugging Face causal LM.

    ``max_batch`` requests run together (the cache holds that many rows of ``max_seq_len`` tokens);
    more wait. ``max_seq_len`` bounds prompt + generated tokens per request (default: the model's
    context, at most 2,048; a sliding-window model is capped at its window, so attention stays exact).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        name: str = "model",
        precision: str = "fp32",
        compile: str = "auto",
        few_row_linears: bool = True,
        long_lived: bool = False,
    ):
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch}: must be at least 1")
        self.model, self.tokenizer, self.name, self.precision = model, tokenizer, name, precision
        config = getattr(model.config, "text_config", None) or model.config
        _check_attention(config)
        limit = sequence_limit(model, tokenizer)
        if max_seq_len is not None and not 1 < max_seq_len <= limit:
            raise ConfigError(
                f"max_seq_len={max_seq_len}: must be in [2, {limit}] (the model's context"
                f"{', capped at its sliding window' if _sliding_window(config) else ''})"
            )
        self.max_seq_len = max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN)
        self.max_batch = max_batch
        self.eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.device = next(model.parameters()).device
        self.compiled = should_compile(compile, self.device, long_lived=long_lived)
        self.cache = SlotCache(config.num_hidden_layers, max_batch, self.max_seq_len, spare=self.compiled)
        self._decode_logits = (
            compile_decode(self._decode_forward, self.device) if self.compiled else self._decode_forward
        )
        self.kernel_linears = cpu_linear.few_row_linears(model, self.device) if few_row_linears else []  # decode's
        self.upcast_attention = cpu_attention.upcasts(model, self.device)  # decode's
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # index = cache row
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)  # see longer_than
        # Encoding and decoding only read the fast tokenizer's backend, so each has its own lock: a prompt
        # tokenized on a server thread never holds up the step's decoding, nor the waiting queue.
        self._lock = threading.Lock()  # the waiting queue, and decoding (the detokenizers)
        self._encode_lock = threading.Lock()
        self.encode("x")  # transformers switches off any truncation the tokenizer file sets at the first encode
        self._ids = itertools.count()

    @classmethod
    def load(
        cls,
        path,
        *,
        precision: str = "auto",
        device: str = "auto",
        threads: int = 0,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        compile: str = "auto",
        few_row_linears: bool = True,
        long_lived: bool = False,
    ) -> Engine:
        """Load a Hugging Face checkpoint directory or a ``.gguf`` file. ``precision`` "auto" is bf16 where the
        hardware computes in bf16, else fp32. Weights come from safetensors; pickled ones (``pytorch_model.bin``)
        are refused unless ``allow_pickle``, and then load with ``torch.load(weights_only=True)``; a checkpoint
        asking for its own code is refused unless ``trust_remote_code`` (see
        :func:`medfoundry.model.load.weights_policy`). ``compile`` and ``long_lived`` (a process that runs for many
        requests, the server): see :func:`medfoundry.generation.compiled.should_compile`."""
        from medfoundry.model.load import load_model

        loaded = load_model(
            Path(path),
            precision=precision,
            device=device,
            threads=threads,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        if loaded.precision == "bf16":
            loaded.model.to(torch.bfloat16)
        return cls(
            loaded.model,
            loaded.tokenizer,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            name=loaded.name,
            precision=loaded.precision,
            compile=compile,
            few_row_linears=few_row_linears,
            long_lived=long_lived,
        )

    # ---- requests, from any thread

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        with self._encode_lock:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def longer_than(self, text: str, tokens: int) -> bool:
        """Whether ``text`` surely has more than ``tokens`` tokens, known without tokenizing it: no token stands
        for more characters than the longest one in the vocabulary."""
        return len(text) > tokens * self.max_token_chars

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, decoded alone with special tokens kept, as vLLM names the tokens of
        log-probabilities (a piece of a multi-byte character is U+FFFD)."""
        with self._lock:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            return [self.tokenizer.convert_tokens_to_string([piece]) for piece in pieces]

    def chat_prompt(self, messages: list[dict], template: str | None = None) -> list[int]:
        """Token ids of a conversation rendered by ``template`` (Jinja; default the tokenizer's own), ending
        with the assistant's turn. The template writes the special tokens (BOS included) itself."""
        return self.encode(self.chat_text(messages, template), add_special_tokens=False)

    def chat_text(self, messages: list[dict], template: str | None = None) -> str:
        """The text of :meth:`chat_prompt`, before tokenizing (encode it without special tokens)."""
        from jinja2 import TemplateError

        template = template or self.tokenizer.chat_template
        if not template:
            raise ValueError(
                "this model has no chat template: give one with --chat-template FILE (or use plain completions)"
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as exc:
            raise ValueError(f"messages: the chat template refused them: {exc}") from None

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingConfig | None = None,
        request_id: str | None = None,
        *,
        logprobs: LogprobOptions | None = None,
    ) -> Request:
        """Queue a generation (default: :class:`SamplingConfig`'s defaults, greedy); a text prompt is tokenized with
        the tokenizer's special tokens (e.g. BOS). ``logprobs`` asks for log-probabilities in its outputs."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids)
        params = params or SamplingConfig()
        request = Request(
            id=request_id or f"req-{next(self._ids)}",
            prompt_ids=ids,
            params=params,
            sampler=TokenSampler(params, ids, self.vocab_size),
            detokenizer=_LockedDetokenizer(self, ids),
            stopper=StopMatcher(params.stops),
            logprobs=logprobs or LogprobOptions(),
        )
        with self._lock:
            self.waiting.append(request)
        return request

    def check_prompt(self, ids: list[int]) -> None:
        """Raise ``ValueError`` (saying why) for a prompt this engine cannot run."""
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(ids) > self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; this engine holds at most {self.max_seq_len} "
                "per request (prompt + generated)"
            )
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")

    def cancel(self, request: Request, reason: str = "abort") -> None:
        """Stop a request at the next step boundary, ending it with ``reason``; its slot is freed then."""
        request.cancelled = reason

    def abort_all(self, reason: str = "abort") -> list[Output]:
        """Finish every request at once: the worker's way out of a failed step, whose state it cannot trust."""
        with self._lock:
            everyone = self.running + list(self.waiting)
            self.running, self.waiting = [], deque()
        for request in everyone:
            request.finish_reason, request.row = reason, -1
        return [self._output(request, "", []) for request in everyone]

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- stepping, from one thread

    def step(self) -> list[Output]:
        """Admit waiting requests into free slots (prefill; a long prompt's first piece), prefill the next piece of
        the oldest long prompt, then decode one token for every running request whose prompt is in the cache."""
        with torch.inference_mode():
            outputs = self._reap_cancelled()
            joiners = self._admit()
            if joiners:
                outputs += self._prefill(joiners)
            ready = self._ready_rows()
            if ready < len(self.running):  # the oldest long prompt: the first row still prefilling
                outputs += self._prefill_piece(self.running[ready])
            if self._ready_rows():
                outputs += self._decode()
        return outputs

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingConfig | list[SamplingConfig] | None = None,
        *,
        progress: bool = False,
    ) -> list[Completion]:
        """Run ``prompts`` to completion (continuously batched) and return them in order."""
        from tqdm import tqdm

        all_params = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.add_request(p, sp) for p, sp in zip(prompts, all_params, strict=True)]
        texts: dict[str, list[str]] = {r.id: [] for r in requests}
        with tqdm(total=len(requests), desc="generate", unit="prompt", disable=not progress) as bar:
            while any(r.finish_reason is None for r in requests):
                for out in self.step():
                    texts[out.request_id].append(out.text)
                    bar.update(out.finish_reason is not None)
        return [Completion("".join(texts[r.id]), r.output_ids, r.finish_reason, len(r.prompt_ids)) for r in requests]

    def warmup(self) -> float:
        """Compile the decode step now rather than in the first requests: a few greedy tokens of a one-token prompt
        alone, then of two at once (the graph of one row and the one of every larger batch: see
        :mod:`medfoundry.generation.compiled`). The requests finish and free their slots. Seconds taken; nothing
        to do for an eager engine."""
        if not self.compiled:
            return 0.0
        start = time.perf_counter()
        params = SamplingConfig(max_tokens=3, temperature=0, ignore_eos=True)
        prompt = self.encode("warm-up", add_special_tokens=False)[:1]
        for batch in sorted({1, min(2, self.max_batch)}):
            self.generate([prompt] * batch, params)
        return time.perf_counter() - start

    def stream(self, prompt: str | list[int], params: SamplingConfig | None = None) -> Iterator[Output]:
        """Generate for one prompt, yielding each step's output (closing the iterator cancels it)."""
        request = self.add_request(prompt, params)
        try:
            while request.finish_reason is None:
                yield from (out for out in self.step() if out.request_id == request.id)
        finally:
            if request.finish_reason is None:
                self.cancel(request)
                self._reap_cancelled()

    # ---- internals

    def _reap_cancelled(self) -> list[Output]:
        outputs = []
        with self._lock:
            dropped = [r for r in self.waiting if r.cancelled]
            for request in dropped:
                self.waiting.remove(request)
        for request in dropped + [r for r in self.running if r.cancelled]:
            request.finish_reason = request.cancelled
            if request.row >= 0:
                self._release(request)
            outputs.append(self._output(request, "", []))
        return outputs

    def _admit(self) -> list[Request]:
        """Waiting requests that fit in the free slots and whose short prompts fit the prefill budget together
        (always at least one); a long prompt, prefilled in pieces, takes a slot only."""
        joiners: list[Request] = []
        longest = batched = 0
        with self._lock:
            while self.waiting and len(self.running) + len(joiners) < self.max_batch:
                if not _in_pieces(self.waiting[0]):
                    size = max(longest, len(self.waiting[0].prompt_ids))
                    if batched and size * (batched + 1) > PREFILL_TOKEN_BUDGET:
                        break
                    longest, batched = size, batched + 1
                joiners.append(self.waiting.popleft())
        return joiners

    def _prefill(self, joiners: list[Request]) -> list[Output]:
        """One batched prefill for the joiners' short prompts; the others take their rows for
        :meth:`_prefill_piece`."""
        short = [r for r in joiners if not _in_pieces(r)]
        outputs = self._prefill_batch(short) if short else []
        for request in joiners:  # after the rows being prefilled, in order of arrival
            if _in_pieces(request):
                request.row, request.pos = len(self.running), 0
                self.running.append(request)
        return outputs

    def _prefill_batch(self, joiners: list[Request]) -> list[Output]:
        """One forward for the joiners' prompts that are new to the engine. A prompt some request already holds in
        its row (a running one's, or another joiner's: the ``n`` samples of one question) is not prefilled
        again: its columns are copied from that row, and the first token chosen from that request's logits
        with the joiner's own sampler."""
        device = self.device  # every input is made on the model's device: one copy of the ids, one of the lengths
        first = self._ready_rows()
        holders = {r.prompt_key: r for r in self.running[:first] if r.prompt_logits is not None}
        fresh, copies, sources = [], [], []  # sources: the request each copy takes its columns and logits from
        for request in joiners:
            if request.prompt_key in holders:
                copies.append(request)
                sources.append(holders[request.prompt_key])
            else:
                holders[request.prompt_key] = request
                fresh.append(request)
        ordered = fresh + copies  # the prefilled rows first: the forward writes rows first .. first + len(fresh)
        self._shift_prefilling(first, len(ordered))  # the joiners decode next step: their rows go before those
        for i, request in enumerate(ordered):  # running before the forward: should it raise, abort_all finds them
            request.row, request.pos = first + i, len(request.prompt_ids)
        self.running[first:first] = ordered
        if fresh:
            width = max(len(r.prompt_ids) for r in fresh)
            ids = torch.tensor([r.prompt_ids + [0] * (width - len(r.prompt_ids)) for r in fresh], device=device)
            lengths = torch.tensor([len(r.prompt_ids) for r in fresh], device=device)
            columns = torch.arange(width, device=device)
            self.cache.bind_prefill(first, len(fresh), width)
            mask = columns[None, :] < lengths[:, None]
            logits = self._forward(ids, mask, columns.expand(len(fresh), width), keep=(lengths - 1)[:, None])[:, -1]
            for request, row in zip(fresh, logits):
                request.prompt_logits = row
        for request, source in zip(copies, sources):
            self.cache.move_row(source.row, request.row, request.pos)
            request.prompt_logits = source.prompt_logits
        if copies:
            logits = torch.stack([r.prompt_logits for r in ordered])
        return self._advance(ordered, logits)

    def _prefill_piece(self, request: Request) -> list[Output]:
        """Prefill the next :data:`PREFILL_CHUNK` tokens of a long or scored prompt into its row, after the pieces
        already there. A scored prompt keeps the log-probability of each prompt token (and the ``k`` likeliest at
        its position), read back in one transfer after the last piece, whose last position chooses the first token."""
        prompt, k = request.prompt_ids, request.logprobs.prompt
        start = request.pos
        end = min(start + PREFILL_CHUNK, len(prompt))
        ids = torch.tensor(prompt[start : end + 1], device=self.device)  # with the next token: the last one's target
        self.cache.bind_prefill(request.row, 1, end, start)
        mask = torch.ones(1, end, dtype=torch.bool, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        logits = self._forward(ids[None, : end - start], mask, positions, keep=1 if k is None else 0)
        request.pos = end
        if k is not None:
            targets = ids[1:]  # what each position predicts: the next prompt token
            logprobs = torch.log_softmax(logits[0, : len(targets)].float(), dim=-1)
            request.prompt_scores.append(pack(logprobs, targets, k))
        if end < len(prompt):
            return []
        outputs = self._advance([request], logits[:, -1])
        if k is not None:
            rows, request.prompt_scores = torch.cat(request.prompt_scores).tolist(), []
            scored = [unpack(row, token, k) for row, token in zip(rows, prompt[1:])]
            outputs[0].prompt_logprobs = [TokenLogprob(prompt[0], None), *scored]
        return outputs

    def _decode(self) -> list[Output]:
        """One token for every running request whose prompt is in the cache: the first rows (those of prompts
        still prefilled in pieces come after them, and sit the step out). Compiled, the batch is padded to its
        bucket: a prefilling row in the padding writes at its next column, which its next piece overwrites, and
        a free row is fed token 0 at column 0, which no request reads (:mod:`medfoundry.generation.compiled`)."""
        rows = self.running[: self._ready_rows()]
        columns, pad = max(r.pos for r in rows) + 1, 0
        if self.compiled:
            columns = kv_bucket(columns, self.max_seq_len, self.device)
            pad = batch_bucket(len(rows), self.max_batch, self.device) - len(rows)
        idle = self.running[len(rows) : len(rows) + pad]
        free = pad - len(idle)
        fed = torch.tensor(  # one copy
            [[r.pos for r in rows + idle] + [0] * free, [r.last for r in rows + idle] + [0] * free],
            device=self.device,
        )
        positions, ids = fed[0], fed[1][:, None]
        mask = torch.arange(columns, device=self.device)[None, :] <= positions[:, None]
        if self.compiled:
            mark_dynamic_sizes(ids, positions, mask)
        with (
            cpu_linear.decode_linears(self.kernel_linears),
            cpu_attention.decode_attention(self.model, self.upcast_attention),
        ):
            logits = self._decode_logits(ids, positions, mask)
        for request in rows:
            request.pos += 1
        return self._advance(rows, logits[: len(rows)])

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) of one decode step: ``ids`` (rows, 1) at ``positions`` (rows,), attending over the
        columns ``mask`` (rows, kv_len) lets through. The cache is bound inside, so that a compiled step traces
        the binding from its inputs' shapes."""
        self.cache.bind_decode(positions, mask)
        return self._forward(ids, mask, positions[:, None], keep=1)[:, -1]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep) -> torch.Tensor:
        """The model's own forward on our cache (inputs on the model's device); logits (rows, kept, vocab) at the
        kept positions of each row (``keep``: a count of last positions, 0 for all, or their indices)."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> list[Output]:
        """Choose each request's next token from its row of ``logits`` (rows, vocab) and record it."""
        if all(r.logprobs.generated is None for r in requests):
            tokens, scores = sample(logits, [r.sampler for r in requests]), [None] * len(requests)
        else:
            tokens, scores = self._sample_scored(requests, logits)
        outputs = [self._accept(*args) for args in zip(requests, tokens, scores)]
        for request in requests:
            if request.finish_reason is not None:
                self._release(request)
        return outputs

    @staticmethod
    def _sample_scored(requests: list[Request], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """The tokens, with the log-probabilities of the rows that asked for them, read back in one transfer."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # first: choose() penalizes float32 logits in place
        tokens = choose(logits, [r.sampler for r in requests])
        k = max(r.logprobs.generated or 0 for r in requests)
        rows = torch.cat([tokens[:, None].float(), pack(logprobs, tokens, k)], dim=1).tolist()
        chosen = [int(row[0]) for row in rows]
        scores = [
            None if r.logprobs.generated is None else unpack(row[1:], token, r.logprobs.generated)
            for r, row, token in zip(requests, rows, chosen)
        ]
        return chosen, scores

    def _accept(self, request: Request, token: int, score: TokenLogprob | None = None) -> Output:
        """Record a sampled token (with its log-probabilities, when asked): its text, and whether the request is
        finished."""
        request.output_ids.append(token)
        request.sampler.observe(token)
        request.last = token
        params = request.params
        text, stopped = "", False
        if token in self.eos_ids and not params.ignore_eos:
            reason = "stop"
        else:
            text, stopped = request.stopper.push(request.detokenizer.push(token))
            reason = "stop" if stopped else None
        if reason is None and (len(request.output_ids) >= params.max_tokens or request.pos >= self.max_seq_len):
            reason = "length"
        if reason is not None and not stopped:
            text += self._flush(request)
        request.finish_reason = reason
        out = self._output(request, text, [token])
        out.logprobs = None if score is None else [score]
        return out

    @staticmethod
    def _flush(request: Request) -> str:
        """Text held back at the end: an incomplete character, a possible start of a stop sequence."""
        tail, stopped = request.stopper.push(request.detokenizer.flush())
        return tail if stopped else tail + request.stopper.flush()

    def _ready_rows(self) -> int:
        """How many running requests decode: rows ``0 ..`` this count - 1; the rows of prompts still prefilled
        in pieces follow, oldest first (the admission, a finished prompt and a freed row all keep that order)."""
        return sum(not r.prefilling for r in self.running)

    @torch.inference_mode()  # the cache's tensors are inference tensors; stream() may cancel outside step()
    def _release(self, request: Request) -> None:
        """Free the request's row, keeping the rows in use contiguous and those being prefilled last: the last
        decoding row moves into a freed decoding row, then the prefilling rows after it move up one."""
        row = request.row
        last = row if request.prefilling else self._ready_rows() - 1  # the last row of the request's group
        if row != last:
            self._move(self.running[last], row)
            self.running[row] = self.running[last]
        del self.running[last]
        self._shift_prefilling(last, -1)
        request.row, request.prompt_logits = -1, None

    def _shift_prefilling(self, first: int, by: int) -> None:
        """Move the rows from ``first`` on (prompts being prefilled) by ``by`` rows, keeping their order."""
        movers = self.running[first:]
        for request in reversed(movers) if by > 0 else movers:
            self._move(request, request.row + by)

    def _move(self, request: Request, row: int) -> None:
        """Put ``request``'s tokens in the cache in ``row`` (its place in the running list is the caller's)."""
        self.cache.move_row(request.row, row, request.pos)
        request.row = row

    @staticmethod
    def _output(request: Request, text: str, tokens: list[int]) -> Output:
        return Output(request.id, text, tokens, request.finish_reason, len(request.prompt_ids), len(request.output_ids))


class _LockedDetokenizer(Detokenizer):
    """Decodes through the engine's lock: the server tokenizes prompts on another thread."""

    def __init__(self, engine: Engine, prompt_ids: list[int]):
        super().__init__(engine.tokenizer, prompt_ids)
        self.engine = engine

    def _decode(self, ids: list[int]) -> str:
        return self.engine.decode(ids)


def _in_pieces(request: Request) -> bool:
    """Whether the request's prompt is prefilled in pieces: a long one (it would hold the running requests back),
    or one scored (only a piece's logits over the vocabulary exist at a time)."""
    return len(request.prompt_ids) > PREFILL_CHUNK or request.logprobs.prompt is not None


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """End-of-sequence tokens: the generation config's (one or a list) and the tokenizer's."""
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return frozenset(ids)


def sequence_limit(model, tokenizer) -> int:
    """The most tokens (prompt + generated) one request may hold: the model's context, capped at its sliding
    window so that attention stays exact."""
    from medfoundry.model.load import context_window

    config = getattr(model.config, "text_config", None) or model.config
    return min(context_window(config, tokenizer), _sliding_window(config) or 1 << 62)


def _sliding_window(config) -> int | None:
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)


def _check_attention(config) -> None:
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= _ATTENTION_LAYERS:
        raise ConfigError(
            f"layer types {sorted(kinds - _ATTENTION_LAYERS)}: the engine serves attention-only models "
            "(GPT-2, LLaMA, BLOOM, Mistral, Qwen, ...)"
        )
