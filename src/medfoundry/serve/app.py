"""The OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

One :class:`~medfoundry.serve.worker.EngineWorker` thread runs the model; each HTTP request becomes one
engine request per choice, and its outputs come back through an asyncio queue, either gathered into one
JSON answer or streamed as server-sent events in OpenAI's chunk format (ending with ``data: [DONE]``).
Log-probabilities (``logprobs``, ``echo``; see :mod:`medfoundry.serve.protocol`) come from the engine with the
tokens, and their token texts are decoded here, off the event loop for a whole answer.
A client that goes away is noticed (the stream is cancelled, even before it started, or polling for a
non-streamed answer sees the disconnect) and its requests leave the batch at the next step. Prompts are
tokenized on a thread, so a long one does not pause the streams of others, and refused by their length
in characters when that alone shows they are too long.

Security (see :mod:`medfoundry.serve.guard`): the CLI binds 127.0.0.1; with an API key, every route
needs it (/metrics and /openapi.json too) except the web page's shell (``/``, ``/static/``) and the bare
liveness probe ``/health``, which reveal nothing; without one, only local Host names (and those allowed)
are answered; bodies must be JSON, and those over ``max_body_bytes`` are refused before they are read.
Logs never hold prompts, outputs or keys: the access log (written here, not by uvicorn) has the method,
path, status and client, never the query string or a header; validation errors name fields, never echo
values. Every error is a JSON body in OpenAI's format.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.routing import Match

from medfoundry.generation.engine import Output
from medfoundry.generation.logprobs import LogprobOptions, TokenLogprob
from medfoundry.serve import openapi, protocol
from medfoundry.serve.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_LOGPROBS
from medfoundry.serve.guard import ApiKeyGuard, BodyLimit, JsonBodies, LocalHosts
from medfoundry.serve.protocol import ChatCompletionRequest, CompletionRequest
from medfoundry.serve.worker import EngineWorker, QueueFull

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
STATIC = Path(__file__).with_name("static")  # the web chat page
ACCESS_LOG = "medfoundry.serve.access"
UNFINISHED = ("error", "timeout")  # finish reasons that end a request with an error (see _Service._failure)


@dataclass
class ServerConfig:
    """What the server enforces. ``max_tokens`` (per request) defaults to the engine's sequence length and
    ``max_prompt_tokens`` to one less; ``chat_template`` (Jinja text) overrides the tokenizer's; larger
    bodies than ``max_body_bytes`` get a 413. Without ``api_key``, requests naming another Host than
    localhost or one of ``allowed_hosts`` get a 421. ``max_logprobs`` bounds completions' ``logprobs`` and chat's
    ``top_logprobs``. (The time a request may take is the worker's.)"""

    model_name: str
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    chat_template: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_logprobs: int = DEFAULT_MAX_LOGPROBS


class APIError(Exception):
    """An error answered in OpenAI's format, with its status code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def create_app(worker: EngineWorker, config: ServerConfig) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the worker thread. No /docs or /redoc: their pages
    load Swagger UI from a CDN, and the description they show needs the API key."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        yield
        worker.stop()

    service = _Service(worker, config)
    app = FastAPI(
        title="medfoundry",
        summary=f"OpenAI-compatible API for {config.model_name}",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)  # the last added is the outermost
    app.add_middleware(JsonBodies)
    app.add_middleware(ApiKeyGuard, api_key=config.api_key)
    if not config.api_key:
        app.add_middleware(LocalHosts, allowed=config.allowed_hosts)
    app.add_middleware(_Observe, metrics=worker.metrics, routes=app.routes)  # outermost: sees every answer

    app.add_api_route("/v1/models", service.models, methods=["GET"], responses={200: {"model": protocol.ModelList}})
    app.add_api_route(
        "/v1/models/{model_id:path}",
        service.model,
        methods=["GET"],
        responses={200: {"model": protocol.ModelCard}, **openapi.errors(404)},
    )
    app.add_api_route(
        "/v1/completions",
        service.complete,
        methods=["POST"],
        responses=openapi.generation_responses(protocol.Completion, protocol.CompletionChunk),
    )
    app.add_api_route(
        "/v1/chat/completions",
        service.chat,
        methods=["POST"],
        responses=openapi.generation_responses(protocol.ChatCompletion, protocol.ChatCompletionChunk),
    )
    app.add_api_route(
        "/health",
        service.health,
        methods=["GET"],
        responses={
            200: {"model": protocol.Health},
            503: {"model": protocol.Health, "description": "The engine thread died"},
        },
    )
    app.add_api_route(
        "/metrics",
        service.metrics,
        methods=["GET"],
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format"}},
    )
    app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    openapi.install(
        app,
        model=config.model_name,
        max_tokens=service.max_tokens,
        secured=bool(config.api_key),
        chunks=[protocol.CompletionChunk, protocol.ChatCompletionChunk],
    )
    return app


def serve(
    worker: EngineWorker, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Run the server until interrupted, with uvicorn's access log replaced by ours (no query strings)."""
    import uvicorn

    uvicorn.run(
        create_app(worker, config), host=host, port=port, log_level=log_level, log_config=_log_config(log_level)
    )


def _log_config(log_level: str) -> dict:
    """uvicorn's logging setup, its access lines coming from :class:`_Observe` instead of uvicorn itself,
    which would print the request line whole, query string included (where clients put keys)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    ours = config["loggers"].pop("uvicorn.access")
    config["loggers"][ACCESS_LOG] = {**ours, "level": log_level.upper()}
    config["loggers"]["uvicorn.access"] = {"handlers": [], "propagate": False}
    return config


class _Service:
    def __init__(self, worker: EngineWorker, config: ServerConfig):
        self.worker, self.engine, self.config = worker, worker.engine, config
        self.max_tokens = config.max_tokens or self.engine.max_seq_len
        self.max_prompt_tokens = config.max_prompt_tokens or self.engine.max_seq_len - 1
        self.started = int(time.time())

    # ---- plain routes

    async def health(self) -> JSONResponse:
        alive = self.worker.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.worker.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "medfoundry",
            "max_model_len": self.engine.max_seq_len,
        }

    # ---- generation routes

    async def complete(self, body: CompletionRequest, http: Request) -> Response:
        self._check_model(body.model)
        self._check_logprobs("logprobs", body.logprobs)
        texts = body.prompts()
        self._check_capacity(len(texts) * body.n)
        prompts = await asyncio.to_thread(lambda: [self._encode(p) for p in texts])
        echoes = [self._echo(text, ids) for text, ids in zip(texts, prompts)] if body.echo else None
        return await self._generate(http, body, prompts, body.max_tokens, chat=False, echoes=echoes)

    async def chat(self, body: ChatCompletionRequest, http: Request) -> Response:
        self._check_model(body.model)
        self._check_logprobs("top_logprobs", body.top_logprobs)
        self._check_capacity(body.n)
        prompt = await asyncio.to_thread(self._chat_prompt, body)
        return await self._generate(http, body, [prompt], body.requested_max_tokens, chat=True)

    def _check_logprobs(self, name: str, k: int | None) -> None:
        if k is not None and k > self.config.max_logprobs:
            raise APIError(
                400, f"{name}: {k} is more than this server's limit of {self.config.max_logprobs} (--max-logprobs)"
            )

    def _echo(self, prompt: str | list[int], ids: list[int]) -> str:
        """The text an echo repeats: the prompt as sent, or the text of its token ids."""
        return prompt if isinstance(prompt, str) else self.engine.decode(ids)

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.config.model_name!r}",
                code="model_not_found",
            )

    def _check_capacity(self, generations: int) -> None:
        """Refuse at once (before tokenizing anything) more generations than the server ever runs together."""
        if generations > self.worker.capacity:
            raise APIError(
                400,
                f"n: {generations} generations (prompts x n) in one request; this server runs at "
                f"most {self.worker.capacity} at once",
            )

    def _encode(self, prompt: str | list[int], *, special_tokens: bool = True) -> list[int]:
        """A prompt's token ids, checked. Called on a thread (tokenizing up to a megabyte takes a second); a
        text that is too long by its characters alone is refused without being tokenized."""
        if isinstance(prompt, str):
            if self.engine.longer_than(prompt, self.max_prompt_tokens):
                raise APIError(
                    400,
                    f"prompt: {len(prompt)} characters, more than this server's limit of "
                    f"{self.max_prompt_tokens} tokens can hold",
                )
            ids = self.engine.encode(prompt, add_special_tokens=special_tokens)
        else:
            ids = prompt
        try:
            self.engine.check_prompt(ids)
        except ValueError as exc:
            raise APIError(400, f"prompt: {exc}") from None
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"prompt: {len(ids)} tokens, more than this server's limit of {self.max_prompt_tokens}")
        return ids

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        try:
            text = self.engine.chat_text([m.as_template_input() for m in body.messages], self.config.chat_template)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return self._encode(text, special_tokens=False)  # the template wrote the special tokens

    def _check_limit(self, body) -> None:
        """Both of chat's length fields are checked: the one that is used, and the one a client may rely on."""
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name, None)
            if value is not None and value > self.max_tokens:
                raise APIError(400, f"{name}: {value} is more than this server's limit of {self.max_tokens}")

    def _budget(self, prompt: list[int], requested: int | None) -> int:
        """Tokens to generate: as requested (within this server's limit), or what the context leaves after the
        prompt."""
        room = self.engine.max_seq_len - len(prompt)
        if requested is None:
            return min(room, self.max_tokens)
        if requested > room:
            raise APIError(
                400,
                f"max_tokens: the prompt's {len(prompt)} tokens plus {requested} to generate exceed "
                f"the model's context of {self.engine.max_seq_len} tokens; lower max_tokens or shorten the prompt",
            )
        return requested

    async def _generate(
        self,
        http: Request,
        body,
        prompts: list[list[int]],
        requested: int | None,
        *,
        chat: bool,
        echoes: list[str] | None = None,
    ) -> Response:
        """Generate ``body.n`` choices per prompt; ``echoes`` (the prompts' texts) are repeated before them."""
        self._check_limit(body)
        requested = requested if body.generates else 1  # a prompt scored alone still takes one step
        try:
            jobs = [
                (ids, body.sampling(self._budget(ids, requested), choice))
                for ids in prompts
                for choice in range(body.n)
            ]
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        try:
            generation = _Generation(self.worker, jobs, body.logprob_options())
        except QueueFull as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None
        reply = _Reply(
            protocol.new_id("chatcmpl" if chat else "cmpl"),
            self.config.model_name,
            chat,
            prompt_tokens=sum(map(len, prompts)),
            echoes=[echo for echo in echoes or [None] * len(prompts) for _ in range(body.n)],
            logprobs=body.logprob_options().generated is not None,
            generates=body.generates,
            token_texts=self.engine.token_texts,
        )
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        if body.stream:
            return _EventStream(self._stream(generation, reply, body.include_usage, endpoint), generation)
        return await self._collect(http, generation, reply, endpoint)

    async def _collect(self, http: Request, generation: _Generation, reply: _Reply, endpoint: str) -> Response:
        started = time.monotonic()
        next_check = started + DISCONNECT_POLL_S
        try:
            while generation.remaining:
                try:
                    reply.add(*await generation.next(timeout=DISCONNECT_POLL_S))
                except TimeoutError:
                    pass
                if time.monotonic() >= next_check:
                    if await http.is_disconnected():
                        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
                    next_check = time.monotonic() + DISCONNECT_POLL_S
        finally:
            generation.cancel()
        failure = self._failure(reply.unfinished)
        if failure:
            raise failure
        self.worker.metrics.latency.observe(time.monotonic() - started, endpoint=endpoint)
        return JSONResponse(await asyncio.to_thread(reply.body))  # decoding an echoed prompt's tokens takes a while

    async def _stream(self, generation: _Generation, reply: _Reply, include_usage: bool, endpoint: str):
        """The events of a stream (:class:`_EventStream` cancels what is left of ``generation`` at its end)."""
        started = time.monotonic()
        for chunk in reply.opening_chunks():
            yield _event(chunk)
        while generation.remaining:
            index, out = await generation.next()
            failure = self._failure(out.finish_reason)
            if failure:
                yield _event(protocol.error_body(failure.message, failure.kind, code=failure.code))
                return
            chunks = (
                await asyncio.to_thread(reply.chunks, index, out) if out.prompt_logprobs else reply.chunks(index, out)
            )
            for chunk in chunks:
                yield _event(chunk)
        if include_usage:
            yield _event(reply.usage_chunk())
        yield "data: [DONE]\n\n"
        self.worker.metrics.latency.observe(time.monotonic() - started, endpoint=endpoint)

    def _failure(self, finish_reason: str | None) -> APIError | None:
        """The error of a generation that did not finish: its step failed, or it ran past the time limit."""
        if finish_reason == "error":
            return APIError(500, "generation failed (see the server log)", "server_error")
        if finish_reason == "timeout":
            return APIError(
                504,
                f"generation took longer than this server's limit of {self.worker.request_timeout:g} s",
                "server_error",
                code="timeout",
            )
        return None


class _EventStream(StreamingResponse):
    """A server-sent event stream that cancels what is left of its generation however it ends: done, failed,
    or never started. The generator of events may never run (a server of ASGI 2.4 raises from ``send`` when
    the client has gone before the response starts), and then neither would a ``finally`` in it."""

    def __init__(self, events, generation: _Generation):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


class _Generation:
    """The engine requests behind one HTTP request; their outputs arrive on an asyncio queue."""

    def __init__(self, worker: EngineWorker, jobs: list, logprobs: LogprobOptions):
        self.worker = worker
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink_for(index: int):
            def sink(out: Output) -> None:
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
                except RuntimeError:  # the event loop is closed: the server is shutting down
                    pass

            return sink

        self.requests = worker.submit([(ids, params, sink_for(i), logprobs) for i, (ids, params) in enumerate(jobs)])
        self.remaining = len(self.requests)

    async def next(self, timeout: float | None = None) -> tuple[int, Output]:
        index, out = await asyncio.wait_for(self.queue.get(), timeout)
        if out.finish_reason is not None:
            self.remaining -= 1
        return index, out

    def cancel(self) -> None:
        """Free the slots of requests still running (a no-op once all are finished)."""
        self.worker.cancel(self.requests)


@dataclass
class _Choice:
    """One choice's answer so far."""

    echo: str | None  # the prompt's text, still to be sent before the generated one
    texts: list[str] = field(default_factory=list)
    scores: list[TokenLogprob] = field(default_factory=list)
    reason: str | None = None
    completion_tokens: int = 0
    offset: int = 0  # characters of the tokens whose log-probabilities were streamed: the next one's text_offset


class _Reply:
    """Accumulates one HTTP request's choices and renders them as an answer or as stream chunks. With ``echoes``,
    each choice starts with its prompt's text (and log-probabilities); without ``generates``, that is all."""

    def __init__(
        self,
        request_id: str,
        model: str,
        chat: bool,
        *,
        prompt_tokens: int,
        echoes: list[str | None],
        logprobs: bool,
        generates: bool,
        token_texts: Callable[[list[int]], list[str]],
    ):
        self.id, self.model, self.chat = request_id, model, chat
        self.prompt_tokens = prompt_tokens
        self.choices = [_Choice(echo) for echo in echoes]
        self.logprobs, self.generates, self.token_texts = logprobs, generates, token_texts

    @property
    def unfinished(self) -> str | None:
        """The finish reason of a choice that did not finish ("error", "timeout"), if any."""
        return next((c.reason for c in self.choices if c.reason in UNFINISHED), None)

    def add(self, index: int, out: Output) -> tuple[str, list[TokenLogprob]]:
        """Record an output; return the text and log-probabilities it adds to the answer (the echoed prompt's
        first, which come with the request's first output)."""
        choice = self.choices[index]
        text, scores = "", []
        if choice.echo is not None:
            text, choice.echo = choice.echo, None
            scores = list(out.prompt_logprobs or ())
        if self.generates:
            text += out.text
            scores += out.logprobs or ()
            choice.completion_tokens = out.completion_tokens
        choice.texts.append(text)
        choice.scores += scores
        choice.reason = out.finish_reason
        return text, scores

    def body(self) -> dict:
        texts = self._texts([s for c in self.choices for s in c.scores])
        choices = [
            {"text": "".join(c.texts), "finish_reason": c.reason, "logprobs": self._logprobs(c.scores, texts)}
            for c in self.choices
        ]
        build = protocol.chat_response if self.chat else protocol.completion_response
        return build(self.id, self.model, choices, self.prompt_tokens, self._completion_tokens)

    def opening_chunks(self) -> list[dict]:
        """Chat streams first announce the assistant role of every choice."""
        if not self.chat:
            return []
        return [
            protocol.chat_chunk(self.id, self.model, i, {"role": "assistant", "content": ""}, None)
            for i in range(len(self.choices))
        ]

    def chunks(self, index: int, out: Output) -> list[dict]:
        """The chunks of one output: its text and log-probabilities, then (at the end) one with the finish reason."""
        text, scores = self.add(index, out)
        chunks = []
        if text or (self.logprobs and scores):
            texts = self._texts(scores)
            logprobs = self._logprobs(scores, texts, self.choices[index].offset)
            self.choices[index].offset += sum(len(texts[s.token]) for s in scores)
            chunks.append(self._chunk(index, text, None, logprobs))
        if out.finish_reason is not None:
            chunks.append(self._chunk(index, "", out.finish_reason, None))
        return chunks

    def _chunk(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        if self.chat:
            delta = {"content": text} if text or logprobs else {}
            return protocol.chat_chunk(self.id, self.model, index, delta, finish_reason, logprobs)
        return protocol.completion_chunk(self.id, self.model, index, text, finish_reason, logprobs)

    def _texts(self, scores: list[TokenLogprob]) -> dict[int, str]:
        """The texts of the tokens that ``scores`` name, each decoded once."""
        if not self.logprobs:
            return {}
        ids = list(protocol.logprob_token_ids(scores))
        return dict(zip(ids, self.token_texts(ids)))

    def _logprobs(self, scores: list[TokenLogprob], texts: dict[int, str], offset: int = 0) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return protocol.chat_logprobs(scores, texts)
        return protocol.completion_logprobs(scores, texts, offset)

    @property
    def _completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return protocol.usage_chunk(self.id, self.model, kind, self.prompt_tokens, self._completion_tokens)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's ``{"error": {...}}`` shape; invalid bodies are 400s that name the field (never
    echoing the value: it may be the prompt)."""

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(protocol.error_body(exc.message, exc.kind, code=exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        problems = [_problem(error) for error in exc.errors()]
        first = exc.errors()[0] if exc.errors() else {"type": "", "loc": ()}
        param = _field(first) if first["type"] != "json_invalid" else None
        return JSONResponse(protocol.error_body("; ".join(problems), param=param or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        message = _unreadable(exc.__cause__) if exc.status_code == 400 and exc.__cause__ else str(exc.detail)
        return JSONResponse(
            protocol.error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers
        )  # a 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def crashed(_request, _exc: Exception):  # uvicorn logs the traceback
        return JSONResponse(protocol.error_body("internal error (see the server log)", "server_error"), status_code=500)


def _unreadable(cause: BaseException) -> str:
    """Why FastAPI could not parse a body as JSON (it says only "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return "body: not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deeply"
    return "body: not valid JSON (e.g. a number too long to read)"


def _field(error: dict) -> str:
    return ".".join(str(part) for part in error["loc"] if part != "body")


def _problem(error: dict) -> str:
    """One validation error as ``field: rule``; a body that is not a JSON object says what is expected."""
    where, message = _field(error), error["msg"].removeprefix("Value error, ")
    if error["type"] == "json_invalid":
        return f"body: not valid JSON ({error.get('ctx', {}).get('error', 'decode error')} at character {where})"
    if error["type"] == "missing" and error["loc"] == ("body",):
        return "body: a JSON object is required"
    if error["type"] == "model_attributes_type":
        return f"body: {message}; send a JSON object with 'Content-Type: application/json'"
    return f"{where}: {message}" if where else message


class _Observe:
    """ASGI middleware counting answers by route and status for /metrics and writing the access log line
    (client, method, path, status: no query string, no header, no body). A plain ASGI wrapper: it never
    buffers streams."""

    def __init__(self, app, metrics, routes: list):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.log = logging.getLogger(ACCESS_LOG)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.inc(endpoint=self._endpoint(scope), status=str(status[0]))
            client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
            self.log.info(
                '%s - "%s %s HTTP/%s" %d',
                client,
                scope["method"],
                quote(scope["path"]),
                scope["http_version"],
                status[0],
            )

    def _endpoint(self, scope) -> str:
        """The route's path template (``/v1/models/{model_id:path}``), or "other" when none matches."""
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return route.path
        return "other"
