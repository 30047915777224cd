"""The OpenAI-compatible server, driven by the official ``openai`` client against uvicorn on a loopback port:
models, completions and chat (plain and streamed), API key, validation errors, the 429 of a full queue, a
client that disconnects mid-stream, /health and /metrics."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn

from medfoundry.generation.engine import Engine
from medfoundry.serve.app import ServerConfig, create_app
from medfoundry.serve.worker import EngineWorker
from test_serve_engine import gpt2_dir, hf_greedy  # noqa: F401  (gpt2_dir: session fixture, the tiny GPT-2 checkpoint)

KEY = "test-key-123"
PROMPT = "The patient presented with"


@contextmanager
def serving(app):
    """uvicorn serving ``app`` in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def running_server(engine: Engine, config: ServerConfig, max_queue: int):
    """The app of ``engine`` served on a free loopback port; yields (base URL, worker)."""
    worker = EngineWorker(engine, max_queue=max_queue)
    with serving(create_app(worker, config)) as url:
        yield url, worker


@pytest.fixture(scope="module")
def server(gpt2_dir):
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2, max_seq_len=128)
    with running_server(engine, ServerConfig(model_name="tiny", api_key=KEY, max_tokens=100), max_queue=2) as (
        url,
        worker,
    ):
        yield url, worker


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def http(url: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_idle(worker: EngineWorker, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while worker.engine.has_work and time.monotonic() < deadline:
        time.sleep(0.02)
    return not worker.engine.has_work


def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert http(url + "/health", key=None) == (200, '{"status":"ok"}')
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    status, text = http(url + "/metrics")
    assert status == 200
    assert 'medfoundry_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "medfoundry_queue_depth 0" in text and "medfoundry_batch_slots 2" in text
    assert "medfoundry_request_duration_seconds_bucket" in text and "medfoundry_generation_tokens_total" in text


def test_completion_plain_and_streamed_agree(server, client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].text
    assert plain.usage.completion_tokens == 12
    assert plain.usage.prompt_tokens == len(server[1].engine.encode(PROMPT))
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_several_prompts_and_choices(client):
    out = client.completions.create(
        model="tiny", prompt=[PROMPT, "Aspirin"], n=2, max_tokens=5, temperature=1.0, seed=3
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 20
    again = client.completions.create(
        model="tiny", prompt=[PROMPT, "Aspirin"], n=2, max_tokens=5, temperature=1.0, seed=3
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible


def test_stop_sequence(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = full[4:9]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_chat_plain_and_streamed(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is aspirin?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].finish_reason == "length"
    stream = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == plain.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"
    default = client.chat.completions.create(model="tiny", messages=messages, temperature=0, seed=1)
    assert default.usage.prompt_tokens + default.usage.completion_tokens <= 128  # no max_tokens: the context left


def test_sse_wire_format(server):
    status, body = http(
        server[0] + "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    )
    events = [line for line in body.split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    status, _ = http(server[0] + "/v1/models", key=None)
    assert status == 401


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 101}, "limit of 100"),
        ({"max_tokens": 100, "prompt": "word " * 60}, "context of 128"),
        ({"prompt": "word " * 140}, "prompt"),
        ({"prompt": ""}, "empty"),
        ({"logprobs": 21}, "logprobs: 21 is more than this server.s limit of 20"),
        ({"stop": [str(i) for i in range(17)]}, "at most 16"),
        ({"n": 5}, "at most 4 at once"),
    ],
)
def test_invalid_requests_are_400s_that_say_why(client, fields, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(**{"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **fields})


def test_malformed_bodies(server, client):
    status, body = http(server[0] + "/v1/completions", {"prompt": PROMPT})
    assert status == 400 and "model" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])


def test_full_queue_is_429_and_disconnects_free_slots(server, client, monkeypatch):
    """Two slots and two waiting places: a fifth request is refused; closing the streams frees everything."""
    url, worker = server
    step = worker.engine.step
    monkeypatch.setattr(worker.engine, "step", lambda: (time.sleep(0.1), step())[1])  # 90 tokens take > 9 s
    streams = [
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=90, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        for _ in range(4)
    ]
    next(iter(streams[0]))
    with pytest.raises(openai.RateLimitError, match="busy"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5)
    assert len(worker.engine.running) == 2 and len(worker.engine.waiting) == 2
    for stream in streams:
        stream.close()
    assert wait_idle(worker, seconds=4.0), "disconnected clients still hold slots"
    _status, text = http(url + "/metrics")
    assert "medfoundry_running_requests 0" in text and 'status="429"' in text
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_chat_without_template_is_a_400_and_no_key_needed(gpt2_dir, tmp_path):
    plain = tmp_path / "no-template"
    shutil.copytree(gpt2_dir, plain)
    (plain / "chat_template.jinja").unlink()
    engine = Engine.load(plain, precision="fp32", device="cpu", threads=1, max_batch=1)
    with torch.no_grad():  # the reference: transformers' greedy decoding of the same prompt
        expected = engine.decode(hf_greedy(engine.model, [engine.encode(PROMPT)], 4)[0])
    assert expected.strip()
    with running_server(engine, ServerConfig(model_name="plain"), max_queue=4) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        # no key configured: any key is accepted, and the completion is the model's greedy continuation
        answer = client.completions.create(
            model="plain", prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert answer.choices[0].text == expected and answer.usage.completion_tokens == 4


def test_disconnect_while_waiting_for_a_plain_answer(server, monkeypatch):
    url, worker = server
    step = worker.engine.step
    monkeypatch.setattr(worker.engine, "step", lambda: (time.sleep(0.1), step())[1])  # 90 tokens take > 9 s
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 90, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 5
        while not worker.engine.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert wait_idle(worker, seconds=4.0), "the slot of a client that left is still busy"
