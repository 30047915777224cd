"""The server when things go wrong (issue 18): a model step that raises, in prefill or in decode, ends every
request with an error and frees its slot; a client that closes its socket before its stream starts frees its
slot at once; a 1 MiB prompt and a slow tokenization do not stall the other streams; a request past the
server's timeout ends with an error; without an API key, only JSON bodies and local Host names get through."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from starlette.requests import ClientDisconnect

from conftest import REPO
from medfoundry.generation.engine import Engine
from medfoundry.serve.app import ServerConfig, create_app
from medfoundry.serve.worker import EngineWorker
from test_serve_api import serving, wait_idle
from test_serve_engine import gpt2_dir  # noqa: F401  (session fixture: the tiny GPT-2 checkpoint)

sys.path.insert(0, str(REPO / "benchmarks"))  # the stream client of the report's server group
import reliability_server as rs

KEY = "test-key-18"
LONG = {"model": "tiny", "prompt": "The patient presented with", "max_tokens": 90, "ignore_eos": True}
MIB = 1 << 20


@contextmanager
def running(gpt2_dir, **config):
    """The app on a tiny GPT-2 (8 slots of 128 tokens) served on a free loopback port: yields (port, worker)."""
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=8, max_seq_len=128)
    worker = EngineWorker(engine, max_queue=4)
    with serving(create_app(worker, ServerConfig(model_name="tiny", max_tokens=100, **config))) as url:
        yield int(url.rsplit(":", 1)[1]), worker


@pytest.fixture(scope="module")
def server(gpt2_dir):
    """With an API key; bodies up to 2 MiB."""
    with running(gpt2_dir, api_key=KEY, max_body_bytes=2 * MIB) as (port, worker):
        yield port, worker


@pytest.fixture(scope="module")
def open_server(gpt2_dir):
    """No API key; one more Host name allowed."""
    with running(gpt2_dir, allowed_hosts=("medfoundry.lab.internal",)) as (port, worker):
        yield port, worker


def slow_steps(monkeypatch, worker: EngineWorker, seconds: float) -> None:
    """Each engine step takes ``seconds`` longer: a 90-token request then lasts seconds, not milliseconds."""
    step = worker.engine.step
    monkeypatch.setattr(worker.engine, "step", lambda: (time.sleep(seconds), step())[1])


def slow_tokenizing(monkeypatch, engine: Engine, seconds: float, marker: str = "") -> None:
    """Tokenizing a text that holds ``marker`` takes ``seconds`` longer (patched on the tokenizer's class)."""
    encode = type(engine.tokenizer).encode

    def slow_encode(tokenizer, text, *args, **kwargs):
        if marker in text:
            time.sleep(seconds)
        return encode(tokenizer, text, *args, **kwargs)

    monkeypatch.setattr(type(engine.tokenizer), "encode", slow_encode)


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def in_thread(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run ``function`` in a thread; its result lands in the returned list."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


class ForwardFault:
    """The engine's forward, failing once armed as an out-of-memory would: at the next prefill, or (``decode``)
    at the decode step right after a prefill, when the step's new requests have left the waiting queue and some
    may already have finished."""

    def __init__(self, engine: Engine, where: str):
        self.forward, self.where = engine._forward, where
        self.armed, self.fired, self.after_prefill = False, 0, False

    def __call__(self, ids, mask, positions, keep):
        prefill = ids.shape[1] > 1
        hit = self.armed and (prefill if self.where == "prefill" else self.after_prefill and not prefill)
        self.after_prefill = prefill
        if hit:
            self.armed, self.fired = False, self.fired + 1
            raise torch.OutOfMemoryError("injected: out of memory")
        return self.forward(ids, mask, positions, keep)


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_failing_forward_ends_every_request_with_an_error(server, monkeypatch, where):
    """One request streaming, a second joining (one token only, for ``decode``: it finishes in its prefill, and
    that output is lost with the failed step); the forward fails: both get an error event, no slot stays taken,
    and the server generates again."""
    port, worker = server
    slow_steps(monkeypatch, worker, 0.03)
    fault = ForwardFault(worker.engine, where)
    monkeypatch.setattr(worker.engine, "_forward", fault)
    first, streamed = in_thread(rs.stream, port, KEY, LONG, timeout=5)
    wait_until(lambda: worker.engine.running and worker.engine.running[0].output_ids)
    fault.armed = True
    other = {**LONG, "prompt": "Aspirin inhibits"}  # a prompt of its own: one the engine holds is not prefilled
    joining = rs.stream(port, KEY, {**other, "max_tokens": 1 if where == "decode" else 90}, timeout=5)
    first.join()
    assert fault.fired == 1
    for outcome in (streamed[0], joining):
        assert outcome.error and outcome.error.startswith("error event: generation failed"), outcome
    assert wait_idle(worker, 1.0) and not worker._inflight, "a request of the failed step still holds its place"
    assert rs.stream(port, KEY, {**LONG, "max_tokens": 5}).error is None


def test_a_stream_closed_before_it_starts_frees_its_slot(server, monkeypatch):
    """Three clients send a streamed request for 90 tokens and close their socket at once, while the prompt is
    tokenized: the server is idle again within a second (not after the 90 tokens), its slots free for others."""
    port, worker = server
    slow_steps(monkeypatch, worker, 0.05)  # 90 tokens: 4.5 s
    slow_tokenizing(monkeypatch, worker.engine, 0.2)  # the client is gone before its stream starts
    submitted = []
    submit = worker.submit
    monkeypatch.setattr(worker, "submit", lambda jobs: submitted.extend(jobs) or submit(jobs))
    body = json.dumps({**LONG, "stream": True}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(rs.raw_request("POST", "/v1/completions", body, key=KEY))
    wait_until(lambda: len(submitted) == 3)
    assert wait_idle(worker, 1.0), "the requests of clients that left still hold their slots"
    assert rs.stream(port, KEY, {**LONG, "max_tokens": 5}).error is None


def test_a_stream_whose_start_fails_is_cancelled(server, monkeypatch):
    """A server of ASGI 2.4 (Hypercorn, Granian) raises ``OSError`` from ``send`` once the client has gone: the
    stream's start fails, so its events are never iterated (and a ``finally`` among them never runs). The
    generation behind it must be cancelled all the same. (The app is called directly, on the worker of
    ``server``.)"""
    _, worker = server
    slow_steps(monkeypatch, worker, 0.02)  # 90 tokens: 1.8 s
    app = create_app(worker, ServerConfig(model_name="tiny", api_key=KEY))
    body = json.dumps({**LONG, "stream": True}).encode()
    headers = {"host": "127.0.0.1", "content-type": "application/json", "authorization": f"Bearer {KEY}"}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in {**headers, "content-length": str(len(body))}.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop() if messages else await asyncio.Future()  # nothing more until the end

    async def send(message):
        if message["type"] == "http.response.start":
            raise OSError("the client has gone")

    submitted = []
    submit = worker.submit
    monkeypatch.setattr(worker, "submit", lambda jobs: submitted.extend(jobs) or submit(jobs))
    with pytest.raises(ClientDisconnect):
        asyncio.run(app(scope, receive, send))
    assert len(submitted) == 1
    assert wait_idle(worker, 1.0), "the request of a client that had gone runs on"


def test_a_huge_prompt_does_not_stall_the_other_streams(server, monkeypatch):
    """Eight clients stream while a 1 MiB completion prompt, a 1 MiB chat message and a prompt whose
    tokenization takes 0.8 s arrive: the long ones are refused (400), and no stream pauses meanwhile (the
    length is bounded before tokenizing, and tokenizing runs off the event loop, outside the engine's lock)."""
    port, worker = server
    slow_steps(monkeypatch, worker, 0.02)  # 70 tokens: 1.4 s at least
    clients = [in_thread(rs.stream, port, KEY, {**LONG, "max_tokens": 70}, timeout=30) for _ in range(8)]
    wait_until(lambda: len(worker.engine.running) == 8 and all(r.output_ids for r in worker.engine.running))
    slow_text = "sepsis " * 200
    slow_tokenizing(monkeypatch, worker.engine, 0.8, marker=slow_text)
    huge = "The patient presented with sepsis. " * (MIB // 36)
    chat = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": huge}]}
    answers = [
        rs.request(port, "POST", "/v1/completions", {"model": "tiny", "prompt": huge}, key=KEY),
        rs.request(port, "POST", "/v1/chat/completions", chat, key=KEY),
        rs.request(port, "POST", "/v1/completions", {"model": "tiny", "prompt": slow_text}, key=KEY),
    ]
    assert len(worker.engine.running) == 8, "the streams ended before the long prompts were answered"
    for thread, _ in clients:
        thread.join()
    assert [status for status, _ in answers] == [400, 400, 400]
    assert all(b"prompt" in text for _, text in answers)
    streams = [result[0] for _, result in clients]
    assert all(s.error is None for s in streams), [s.error for s in streams]
    assert max(s.gap for s in streams) < 0.4, f"a stream paused {max(s.gap for s in streams):.2f} s"


def test_a_request_past_the_timeout_ends_with_an_error(server, monkeypatch):
    """With a 0.5 s limit, a stream of 90 slow tokens ends with a timeout error event and a plain request with a
    504, both long before their tokens would have been generated, and their slots are free."""
    port, worker = server
    monkeypatch.setattr(worker, "request_timeout", 0.5)
    slow_steps(monkeypatch, worker, 0.05)  # 90 tokens: 4.5 s
    started = time.monotonic()
    _, plain = in_thread(rs.request, port, "POST", "/v1/completions", LONG, key=KEY)
    streamed = rs.stream(port, KEY, LONG, timeout=10)
    wait_until(lambda: plain)
    assert time.monotonic() - started < 2.5
    assert wait_idle(worker, 0.5)
    assert streamed.error == "error event: generation took longer than this server's limit of 0.5 s", streamed
    status, body = plain[0]
    assert status == 504 and json.loads(body)["error"]["code"] == "timeout"


def status_of(port: int, method: str, path: str, headers: dict | None = None, key: str | None = None) -> int:
    """The status of a raw request (a POST carries a completion request) with exactly ``headers`` besides Host
    (127.0.0.1 unless given), Content-Length and the key: no Content-Type unless given."""
    body = json.dumps({"model": "tiny", "prompt": "Aspirin", "max_tokens": 2}).encode() if method == "POST" else b""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    fields = {"Host": "127.0.0.1", "Connection": "close", "Content-Length": str(len(body)), **auth, **(headers or {})}
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return rs.send_raw(port, f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body)[0]


def test_without_a_key_a_web_page_cannot_post_or_rebind(open_server):
    """A page can make its visitor's browser POST without asking the server first (no CORS preflight) only with
    a form's or plain text's Content-Type, or none: 415. A page served from a domain name that resolves to
    127.0.0.1 (DNS rebinding) sends that name as the Host: 421. The local names, with or without a port, and
    the names allowed are answered."""
    port, _ = open_server
    json_type = {"Content-Type": "application/json"}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert status_of(port, "POST", "/v1/completions", {"Content-Type": content_type}) == 415, content_type
    assert status_of(port, "POST", "/v1/completions") == 415  # a body without a Content-Type
    assert status_of(port, "POST", "/v1/completions", {"Content-Type": "application/json; charset=utf-8"}) == 200
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "[::2]:8000"):
        assert status_of(port, "POST", "/v1/completions", {**json_type, "Host": host}) == 421, host
        assert status_of(port, "GET", "/v1/models", {"Host": host}) == 421, host
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", "[::1]:8000", "MedFoundry.lab.internal:443"):
        assert status_of(port, "POST", "/v1/completions", {**json_type, "Host": host}) == 200, host


def test_with_a_key_any_host_is_answered_but_only_json(server):
    """Behind a proxy the Host is the proxy's name: with a key it is not checked. Bodies must be JSON all the
    same."""
    port, _ = server
    assert status_of(port, "GET", "/v1/models", {"Host": "api.example.org"}, key=KEY) == 200
    assert status_of(port, "POST", "/v1/completions", {"Content-Type": "text/plain"}, key=KEY) == 415
