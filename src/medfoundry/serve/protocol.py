"""The OpenAI API's request bodies (validated) and response shapes, for completions and chat completions.

Fields follow the OpenAI reference; vLLM's sampling extensions (``top_k``, ``repetition_penalty``,
``ignore_eos``) are accepted too, since clients written for vLLM send them in ``extra_body``. Log-probabilities
follow vLLM: completions' ``logprobs`` (0 up to the server's ``--max-logprobs``) and ``echo`` (the prompt and its
log-probabilities first; with ``max_tokens: 0``, the prompt alone, which is how scorers such as lm-eval's
``local-completions`` ask for log-likelihoods), chat's ``logprobs`` and ``top_logprobs``. Features the engine
does not have (tools, ``best_of``, ``logit_bias``, ``suffix``, JSON mode) are refused with a 400 that names
them rather than silently ignored; unknown fields are ignored, as vLLM
does (clients send other servers' extensions). Values are checked strictly: a JSON type other than the
documented one (``"stream": "yes"``, ``"n": 2.0``), a non-finite number, a seed outside 64 bits or a
string that is not valid Unicode (a lone surrogate escape) is a 400, not something coerced or
failing later.

The response models at the end describe the answers in the OpenAPI document (the handlers build the
dicts themselves, for speed); the schemathesis tests check that what is sent matches them.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.logprobs import LogprobOptions, TokenLogprob

MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16
LOGPROB_FLOOR = -9999.0  # vLLM's floor for log-probabilities: JSON has no -inf
SEED_RANGE = (-(2**63), 2**63 - 1)  # torch seeds are 64-bit
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = STRICT

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        _check_unicode(data, "")
        return data

    @model_validator(mode="after")
    def _supported(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} sequences")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def sampling(self, max_tokens: int, choice: int) -> SamplingConfig:
        """The sampling of choice number ``choice`` (choices of a seeded request get seeds seed, seed+1, ...); unset
        fields take the OpenAI API's defaults (temperature 1)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return SamplingConfig(
            max_tokens=max_tokens,
            temperature=_default(self.temperature, 1.0),
            top_k=_default(self.top_k, 0),
            top_p=_default(self.top_p, 1.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            presence_penalty=_default(self.presence_penalty, 0.0),
            stop=stops,
            seed=None if self.seed is None else self.seed + choice,
            ignore_eos=self.ignore_eos,
        )

    @property
    def generates(self) -> bool:
        return True

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # the OpenAI default for completions; 0 only with echo
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo (to score the prompt without generating)")
        for name, unsupported in [
            ("best_of other than n", self.best_of is not None and self.best_of != self.n),
            ("suffix", bool(self.suffix)),
        ]:
            if unsupported:
                raise ValueError(f"{name} is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be an empty list")
        return self

    @property
    def generates(self) -> bool:
        """False for ``echo`` with ``max_tokens: 0``: the answer is the prompt alone (the engine still runs one
        step, as vLLM does, whose token is dropped)."""
        return self.max_tokens != 0

    def logprob_options(self) -> LogprobOptions:
        return LogprobOptions(generated=self.logprobs, prompt=self.logprobs if self.echo else None)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: str


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list | None = None
    functions: list | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: allowed only with logprobs: true")
        for name, unsupported in [
            ("tools", bool(self.tools)),
            ("functions", bool(self.functions)),
            ("response_format", self.response_format is not None and self.response_format.type != "text"),
        ]:
            if unsupported:
                raise ValueError(f"{name} is not supported by this server")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_options(self) -> LogprobOptions:
        return LogprobOptions(generated=(self.top_logprobs or 0) if self.logprobs else None)


def _default(value, default):
    return default if value is None else value


def _check_unicode(value, where: str) -> None:
    """Raise ``ValueError`` naming the first string (at any depth) that cannot be UTF-8: JSON's ``\\ud800``
    escapes decode to lone surrogates, which the tokenizer and every UTF-8 writer refuse."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'body'}: not valid Unicode text (an unpaired surrogate escape)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, f"{where}.{index}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_logprobs(scores: list[TokenLogprob], texts: dict[int, str], offset: int = 0) -> dict:
    """The legacy completions' ``logprobs`` of some tokens, as OpenAI and vLLM write them: ``top_logprobs`` maps
    token texts to log-probabilities, the chosen token's then the ``k`` likeliest (which win when two tokens have
    the same text, as in vLLM); ``text_offset`` counts the characters of the tokens before, from ``offset``. The
    first prompt token has ``null`` for both."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for score in scores:
        text = texts[score.token]
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if score.logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_floored(score.logprob))
        top_logprobs.append({text: _floored(score.logprob), **{texts[t]: _floored(lp) for t, lp in score.top}})
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(scores: list[TokenLogprob], texts: dict[int, str]) -> dict:
    """Chat's ``logprobs``: per token its text, log-probability, UTF-8 bytes and the ``top_logprobs`` likeliest."""
    return {
        "content": [
            {
                **_chat_token(texts[score.token], score.logprob),
                "top_logprobs": [_chat_token(texts[t], lp) for t, lp in score.top],
            }
            for score in scores
        ]
    }


def logprob_token_ids(scores: list[TokenLogprob]) -> set[int]:
    """Every token whose text the ``logprobs`` of ``scores`` name."""
    return {score.token for score in scores} | {t for score in scores for t, _ in score.top}


def _chat_token(text: str, logprob: float) -> dict:
    """A piece of a multi-byte character has the text U+FFFD, whose bytes stand in for its own (as in vLLM)."""
    return {"token": text, "logprob": _floored(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}


def _floored(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def completion_response(
    request_id: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c["text"], "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
            for i, c in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(request_id: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": c["logprobs"],
                "finish_reason": c["finish_reason"],
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    request_id: str, model: str, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def chat_chunk(
    request_id: str, model: str, index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(request_id: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


# ---- the answers, as documented in the OpenAPI description

FinishReason = Literal["stop", "length"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Answer(BaseModel):
    id: str
    created: int
    model: str


class CompletionLogprobs(BaseModel):
    """Per token (the prompt's first when echoed): its text, log-probability (``null`` for the first prompt
    token), the likeliest tokens' log-probabilities by text (the chosen one's included), its character offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(_Answer):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(_Answer):
    """A streamed piece of a completion; with ``stream_options.include_usage`` the last one has no choices
    and the usage."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "engine stopped"]
