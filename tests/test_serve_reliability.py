"""The server against hostile clients and under load (CI; ``test_serve_load_long.py`` has the long version):
the API key on every route but an explicit public allowlist, schemathesis on the server's own OpenAPI
description, oversized and malformed requests refused, no prompt, completion or key in any log line, 16
streaming clients for 15 s and clients that drop their requests. The request batteries, the load generator
and the subprocess server are those of ``benchmarks/reliability_server.py`` (the report's ``server`` group)."""

from __future__ import annotations

import json
import random
import re
import sys
import uuid

import pytest
import torch
from starlette.routing import Mount

from conftest import REPO
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from medfoundry.generation.sampling import TokenSampler, sample
from medfoundry.serve.app import ServerConfig, create_app
from medfoundry.serve.worker import EngineWorker
from test_serve_api import serving
from test_serve_engine import gpt2_dir  # noqa: F401  (session fixture: the tiny GPT-2 checkpoint)

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark modules import each other by name
import reliability_server as rs

KEY = "test-key-3a9d"
NAME = "served-model-7f3a"  # distinctive: the public routes must not reveal it
# The routes anyone may reach with a key configured, and why: they reveal nothing and use no model.
PUBLIC = {
    "/": "the web page's shell: static HTML that asks for the key, then fetches the model's name with it",
    "/static": "the page's script and style sheet: static files, the same for every server",
    "/health": "a bare liveness probe for load balancers: {'status': 'ok'} and nothing else",
}


@pytest.fixture(scope="module")
def app_server(gpt2_dir):
    """The app in this process (its routes are enumerated) on a loopback port, at most 8 tokens per request."""
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2, max_seq_len=48)
    worker = EngineWorker(engine, max_queue=4)
    app = create_app(worker, ServerConfig(model_name=NAME, api_key=KEY, max_tokens=8))
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The report's tiny GPT-2 (its own small BPE: no shared data needed)."""
    return rs.tiny_model(tmp_path_factory.mktemp("server") / "tiny-gpt2")


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """``medfoundry serve`` in a subprocess, with the limits the hostile requests expect."""
    with rs.Server(tiny, tmp_path_factory.mktemp("logs") / "server.log", key=KEY) as server:
        yield server


def requests_reaching(route) -> list[tuple[str, str]]:
    """(method, path) of requests that reach ``route``: every method it has, parameters filled in."""
    if isinstance(route, Mount):
        return [("GET", f"{route.path}/chat.js")]
    path = re.sub(r"\{[^}]+\}", NAME, route.path)
    return [(method, path) for method in sorted(route.methods)]


def test_every_route_needs_the_key_but_the_public_allowlist(app_server):
    """Every route of the app, with every method: 401 without the key (OpenAI error, WWW-Authenticate), never
    401 with it. A route added later without the key's protection, or made public without updating
    :data:`PUBLIC`, fails here; so does a public route that reveals the model's name."""
    url, app = app_server
    port = int(url.rsplit(":", 1)[1])
    assert set(PUBLIC) <= {route.path for route in app.routes}, "the allowlist names a route that no longer exists"
    checked = 0
    for route in app.routes:
        for method, path in requests_reaching(route):
            status, body = rs.request(port, method, path)
            if route.path in PUBLIC:
                assert status < 400 and NAME.encode() not in body, (method, path, status)
            else:
                assert status == 401, f"{method} {path} answered {status} without the key"
                assert method == "HEAD" or json.loads(body)["error"]["code"] == "invalid_api_key"
            assert rs.request(port, method, path, key=KEY)[0] not in (401, 500), (method, path)
            assert rs.request(port, method, path, key=KEY + "-wrong")[0] == (200 if route.path in PUBLIC else 401)
            checked += 1
    assert checked >= 9  # 4 API routes, /metrics, /openapi.json (GET, HEAD), the page and its files, /health


def test_openapi_describes_the_answers_the_server_gives(app_server):
    url, _ = app_server
    status, body = rs.request(int(url.rsplit(":", 1)[1]), "GET", "/openapi.json", key=KEY)
    schema = json.loads(body)
    assert status == 200 and schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    operations = {(path, method): op for path, item in schema["paths"].items() for method, op in item.items()}
    for (path, _), operation in operations.items():
        assert "422" not in operation["responses"]  # invalid requests are 400s
        assert ("401" in operation["responses"]) is (path not in PUBLIC), path
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = operations[(path, "post")]["responses"]
        assert {"200", "400", "401", "404", "413", "429"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == [NAME]
    assert {"type": "integer", "minimum": 0, "maximum": 8} in request["max_tokens"]["anyOf"]  # 0: echo alone


def test_schemathesis_finds_nothing(tiny, tmp_path):
    """Boundary (coverage phase) and random (fuzzing phase) requests, positive and negative, against every
    operation; every check but positive_data_acceptance (a prompt's length in tokens is not in a schema). The
    server runs in its own process, so that both cores work."""
    with rs.Server(tiny, tmp_path / "server.log", key=KEY, max_batch=2, max_queue=4, **rs.FUZZ_LIMITS) as server:
        sent, failures = rs.fuzz_api(f"http://127.0.0.1:{server.port}", KEY, examples=8, seed=0)
        assert not failures, "\n".join(failures[:20])
        assert sent > 300 and server.server_errors() == 0


def test_hostile_requests_are_refused(served):
    """No key, wrong keys, oversized bodies (declared and chunked), malformed JSON, non-UTF-8, wrong
    Content-Type, deep nesting, huge and non-finite numbers, lone surrogates, wrong types, every limit:
    each gets its status with an OpenAI error naming the problem; the server stays healthy."""
    probes = rs.hostile_probes(KEY)
    problems = [p for p in (rs.probe_problem(served.port, probe) for probe in probes) if p]
    assert not problems, "\n".join(problems)
    assert len(probes) > 50 and served.server_errors() == 0
    assert served.wait_idle() and served.generates()


def test_errors_name_the_field(served):
    status, body = served.request("POST", "/v1/completions", {"model": rs.MODEL, "prompt": "hi", "temperature": "hot"})
    assert status == 400 and json.loads(body)["error"]["param"] == "temperature"
    status, body = served.request(
        "POST",
        "/v1/chat/completions",
        {"model": rs.MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x\ud800"}]},
    )
    assert status == 400 and "messages.0.content: not valid Unicode" in json.loads(body)["error"]["message"]
    status, body = rs.send_raw(
        served.port,
        rs.raw_request(
            "POST",
            "/v1/completions",
            headers={"Content-Length": str(10 * rs.MAX_BODY), "Content-Type": "application/json"},
            key=KEY,
        ),
    )
    assert status == 413 and f"limit of {rs.MAX_BODY}" in json.loads(body)["error"]["message"]


def test_sixteen_streaming_clients_for_fifteen_seconds(served):
    load = rs.run_load(served, clients=16, seconds=15, seed=1)
    assert not load.errors, load.errors[:5]
    assert load.requests > 100 and load.tokens > 1000, load.summary(warmup=5)
    warm, end = load.rss_growth(warmup=5)
    assert end - warm < rs.RSS_GROWTH_LIMIT * warm, load.summary(warmup=5)
    assert served.wait_idle() and served.server_errors() == 0


def test_clients_that_leave_free_their_slots(served):
    asked, generated = rs.drop_clients(served, streams=8, waiting=4, rng=random.Random(0))
    assert generated < asked / 2, "the requests ran to their end: the drops were not noticed"
    assert served.wait_idle() and served.generates()


def test_logs_hold_no_prompt_no_completion_no_key(tiny, tmp_path):
    """A server at --log-level debug gets good and bad requests carrying canaries (the key, a prompt); its
    whole output (stdout and stderr) must contain neither, nor any completion, yet log every request."""
    key, prompt = f"sk-canary-{uuid.uuid4().hex}", f"Canaryprompt{uuid.uuid4().hex[:12]}"
    log = tmp_path / "server.log"
    with rs.Server(tiny, log, key=key, log_level="debug", max_batch=2, max_queue=4) as server:
        status, body = server.request(
            "POST", "/v1/completions", {"model": rs.MODEL, "prompt": prompt, "max_tokens": 24, "ignore_eos": True}
        )
        completion = json.loads(body)["choices"][0]["text"]
        chat = {"model": rs.MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
        assert rs.stream(server.port, key, chat).error is None
        bad = [
            ({"model": rs.MODEL, "prompt": prompt, "temperature": 5}, 400),
            ({"model": rs.MODEL, "prompt": prompt, "max_tokens": prompt}, 400),
            ({"model": rs.MODEL, "prompt": [prompt, 7]}, 400),
            ({"model": rs.MODEL, "prompt": prompt + "\ud800"}, 400),
            ({"model": rs.MODEL, "prompt": " ".join([prompt] * 400), "max_tokens": 1}, 400),
            ({"model": rs.MODEL, "messages": [{"role": prompt, "content": prompt}]}, 400),
        ]
        statuses = [
            server.request("POST", "/v1/chat/completions" if "messages" in b else "/v1/completions", b)[0]
            for b, _ in bad
        ]
        unfinished = f'{{"model": "{rs.MODEL}", "prompt": "{prompt}'.encode()
        raws = [
            rs.raw_request("POST", "/v1/completions", unfinished, key=key),
            rs.raw_request("POST", "/v1/completions", json.dumps({"prompt": prompt}).encode(), key=key + "x"),
            rs.raw_request("GET", f"/v1/models?api_key={key}&prompt={prompt}"),
            rs.raw_request("GET", f"/v1/models?api_key={key}", key=key),
            rs.chunked_over_limit(key, filler=prompt.encode()),
        ]
        statuses += [rs.send_raw(server.port, raw)[0] for raw in raws]
    assert status == 200 and len(completion) >= 16
    assert statuses == [expected for _, expected in bad] + [400, 401, 401, 200, 413]
    text = log.read_text(errors="replace")
    assert text.count('"POST /v1/completions HTTP/1.1" 400') >= 5 and '"GET /v1/models HTTP/1.1" 401' in text
    for canary in (key, prompt, completion.strip()):
        assert canary not in text, f"{canary!r} is in the server's log"


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-300},
        {"repetition_penalty": 1e-300, "temperature": 1.0},
        {"repetition_penalty": 1e300, "temperature": 1.0},
        {"top_p": 1e-300},
        {"repetition_penalty": 1e-300, "top_k": 3},
        {"frequency_penalty": -2.0},
    ],
)
def test_extreme_sampling_values_still_give_a_token(params):
    """Values schemathesis found crashing the engine step (and with it every request in the batch): logits
    divided into inf made softmax NaN, and a top_p below float32's smallest value masked every token."""
    sampler = TokenSampler(SamplingConfig(**{"temperature": 1.0, **params}), [1, 2, 3], 50)
    logits = torch.randn(1, 50) * 30
    tokens = [sample(logits.clone(), [sampler])[0] for _ in range(20)]
    assert all(0 <= t < 50 for t in tokens)
