"""Server scenarios (group ``server``): ``medfoundry serve`` in a subprocess on a free loopback port, with an
API key (in a file) unless said otherwise, serving a tiny random GPT-2 built here (a byte-level BPE trained
on generated clinical sentences: no ``../shared/data`` needed). Each try starts a fresh server.

- *schemathesis*: schemathesis (in-process, its engine as its CLI runs it) generates requests from the
  server's own OpenAPI description, boundary cases first (coverage phase), then random ones (fuzzing),
  positive and negative, and checks every answer: no 5xx, status codes, content types, headers and
  bodies as documented (JSON answers, event streams chunk by chunk), invalid data rejected, an
  unauthenticated request refused, a wrong method answered 405 with ``Allow``. Only
  ``positive_data_acceptance`` is off: a schema cannot say that a prompt is too many *tokens* long.
  Survived: no check failed and the server answered no 5xx (its own /metrics count).
- *load*: concurrent streaming clients (chat and completions mixed, ``ignore_eos`` so every stream has
  exactly ``max_tokens`` tokens) for a bounded time. Survived: every stream answered 200 and ended with
  its usage and ``[DONE]``, no 5xx, the server idle afterwards, and its resident memory grew by less than
  :data:`RSS_GROWTH_LIMIT` after the warm-up (a leak of even a few KB per request shows over thousands).
- *hostile requests*: :func:`hostile_probes`, sent raw over a socket: no key, a wrong key, the key in the
  query string, bodies over the size limit (declared or chunked), malformed JSON, non-UTF-8 bytes, a
  wrong Content-Type, deep nesting, huge or non-finite numbers, lone surrogates, wrong types, every
  limit passed, garbage that is not HTTP. Each one is an injected fault. Survived: each got its
  expected status (an OpenAI error body where the app answers), then the server is healthy, idle and
  still generates, and counted no 5xx.
- *disconnects*: clients that drop streams after a few events and plain requests whose connection closes
  while they wait, with long generations. Survived: within :data:`RELEASE_S` the server reports no
  running and no queued request (/metrics) and still answers.
- *forward raises*: the server's model fails as it would when out of memory (:data:`FAULTY_FORWARD`): on
  a long prompt's prefill or once a generation grows long, requests the scenario sends while streaming
  clients run. Survived: each of those got the error event of a failed step, every other stream either
  completed or got that error (none hung or broke off), no 5xx, and the server is idle and generates.
- *disconnect before stream*: bursts of streamed requests, as many as the slots and waiting places,
  whose clients close the connection at once. Survived: after each burst the server is idle within
  :data:`IDLE_S` and serves the next client (no 429), and it generated almost none of the tokens asked.
- *long prompt stall*: 1 MiB prompts (completions and chat) sent one after another while 8 clients
  stream. Survived: each got its 400, every stream completed, and none paused longer than
  :data:`STALL_LIMIT_S` between two events.
- *no-key guard*: a server without a key gets POSTs that a web page could send (bodies as forms, plain
  text or untyped: 415) and requests naming foreign Hosts (DNS rebinding: 421), between requests for
  local and allowed names (200); ``medfoundry serve`` must refuse to start without a key on another
  address than loopback, and with ``--api-key``. Survived: every answer as expected, no 5xx.

``server_errors`` are 5xx answers (the server's own count), failed checks, and failed or incomplete streams.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from medfoundry.serve.config import API_KEY_ENV
from reliability_frame import ENV, REPO, Context, Row, attempt, kill_group, medfoundry, run_scenarios

KEY = "reliability-key-2f1c"
MODEL = "tiny"
CONTEXT = 1024  # the tiny model's context and the server's --max-seq-len
MAX_TOKENS = 1000  # the server's --max-tokens: long enough that a dropped request would run for seconds
MAX_BODY = 64 * 1024  # the server's --max-body-bytes
FUZZ_LIMITS = {"context": 64, "max_tokens": 16}  # short generations: schemathesis sends hundreds of requests
RSS_GROWTH_LIMIT = 0.10  # resident memory may grow by at most 10% after the warm-up (about 50 MB here)
RELEASE_S = 5.0  # time for the slots of dropped requests to be freed
IDLE_S = 1.0  # time for the slots of streams closed before they started to be freed
STALL_LIMIT_S = 0.5  # the longest pause a stream may see while 1 MiB prompts arrive (tokenizing one takes ~1 s)
MIB = 1 << 20
OOM_LIMITS = "256,128"  # FAULTY_FORWARD's: prefills over 256 padded tokens, sequences over 128 tokens fail
STEP_FAILED = "error event: generation failed"  # how a stream caught in a failed step ends
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = [
    "The patient presented with",
    "Aspirin inhibits",
    "Randomized trials of statins in elderly patients show",
    "Diagnosis:",
    "β-lactam antibiotics",
    "Metformin 500 mg b.i.d.; HbA1c fell to",
    "Sepsis is defined as",
]


# -- a tiny model -------------------------------------------------------------------------------------


def _sentences(count: int = 3000, seed: int = 0):
    rng = random.Random(seed)
    subjects = ["The patient", "A 54-year-old woman", "The cohort", "Each participant", "The child", "Our team"]
    verbs = ["presented with", "was treated for", "developed", "was screened for", "recovered from", "reported"]
    objects = [
        "sepsis",
        "type 2 diabetes",
        "acute myocardial infarction",
        "pneumonia",
        "β-lactam allergy",
        "hypertension (140/90 mmHg)",
        "an HbA1c of 6.5%",
        "chronic kidney disease",
        "COVID-19",
    ]
    for _ in range(count):
        yield f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} after {rng.randint(1, 30)} days."


def tiny_model(directory: Path) -> Path:
    """A random GPT-2 (the ``gpt2-tiny`` preset) with a 1,000-token byte-level BPE and a chat template."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM

    from medfoundry.model.export import export_hf
    from medfoundry.model.presets import model_config

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        _sentences(),
        trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )  # its progress bar writes to stdout, before the report's table
    source = directory.with_name(directory.name + "-tokenizer")
    source.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(source / "tokenizer.json"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config("gpt2-tiny", vocab_size=tokenizer.get_vocab_size(), context=CONTEXT)
    )
    export_hf(model, source, directory)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory


# -- the server under test ----------------------------------------------------------------------------


def request(
    port: int, method: str, path: str, body: dict | None = None, *, key: str | None = None, timeout: float = 60
) -> tuple[int, bytes]:
    """One request to a loopback port, with ``Authorization: Bearer key`` unless ``key`` is None: (status, body)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def key_file(path: Path, key: str) -> Path:
    """``key`` in a file only its owner reads (the way to give ``medfoundry serve`` a key)."""
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return path


def serve_args(model: Path, port: int, *options: str) -> list[str]:
    """``medfoundry serve``'s arguments for ``model`` on a loopback ``port``, on one CPU thread, in fp32, with the
    eager decode step: the scenarios are about the server, a compile at each server start would double their time,
    and the compiled step under batching and cancellation is tests/test_engine_compile.py's."""
    fixed = ["--port", str(port), "--precision", "fp32", "--threads", "1", "--compile", "off"]
    return ["serve", str(model), *fixed, *options]


SERVER_ENV = {name: value for name, value in ENV.items() if name != API_KEY_ENV}  # no key unless given
# ``medfoundry serve`` whose forward fails as it would when out of memory: a prefill of more than P padded tokens,
# or a decode step once a sequence holds more than D tokens (argv[1] is "P,D"). The requests of the load stay
# far below both; the scenario sends the ones that go above.
FAULTY_FORWARD = """
import sys
import torch
from medfoundry.cli import main
from medfoundry.generation.engine import Engine

prefill_limit, decode_limit = map(int, sys.argv.pop(1).split(","))
forward = Engine._forward

def faulty(self, ids, mask, positions, keep):
    prefill = ids.shape[1] > 1
    if (ids.numel() > prefill_limit) if prefill else (mask.shape[1] > decode_limit):
        raise torch.OutOfMemoryError("injected: out of memory in " + ("prefill" if prefill else "decode"))
    return forward(self, ids, mask, positions, keep)

Engine._forward = faulty
sys.exit(main(sys.argv[1:]))
"""


class Server:
    """``medfoundry serve`` on a free loopback port (stdout and stderr to ``log``); stop it with :meth:`stop`. The
    key (None: no key) is passed in a file beside the log; ``options`` are more flags; ``faults`` (see
    :data:`FAULTY_FORWARD`) runs the server with a forward that fails on large inputs."""

    def __init__(
        self,
        model: Path,
        log: Path,
        *,
        key: str | None = KEY,
        max_batch: int = 8,
        max_queue: int = 64,
        context: int = CONTEXT,
        max_tokens: int = MAX_TOKENS,
        max_body: int = MAX_BODY,
        log_level: str = "info",
        options: tuple[str, ...] = (),
        faults: str | None = None,
    ):
        self.key, self.log, self.port = key, log, free_port()
        args = serve_args(
            model,
            self.port,
            "--served-model-name",
            MODEL,
            "--max-batch",
            str(max_batch),
            "--max-queue",
            str(max_queue),
            "--max-seq-len",
            str(context),
            "--max-tokens",
            str(max_tokens),
            "--max-body-bytes",
            str(max_body),
            "--log-level",
            log_level,
            *(("--api-key-file", str(key_file(log.with_suffix(".key"), key))) if key is not None else ()),
            *options,
        )
        argv = [sys.executable, "-c", FAULTY_FORWARD, faults, *args] if faults else medfoundry(*args)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=SERVER_ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                output = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {output}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.2)

    def request(self, method: str, path: str, body: dict | None = None, *, key: str | None = "") -> tuple[int, bytes]:
        """One request with this server's key (or ``key``; None: no key): (status, body)."""
        return request(self.port, method, path, body, key=self.key if key == "" else key)

    def metrics(self) -> dict[str, float]:
        """/metrics as {series (name and labels): value}."""
        status, text = self.request("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        pairs = (line.rsplit(" ", 1) for line in text.decode().splitlines() if line and not line.startswith("#"))
        return {series: float(value) for series, value in pairs}

    def server_errors(self) -> int:
        """5xx answers the server counted."""
        return int(
            sum(
                v
                for k, v in self.metrics().items()
                if k.startswith("medfoundry_requests_total") and re.search(r'status="5\d\d"', k)
            )
        )

    def wait_idle(self, seconds: float = RELEASE_S) -> bool:
        """Whether the server reports no running and no queued request within ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            found = self.metrics()
            if found["medfoundry_running_requests"] == 0 and found["medfoundry_queue_depth"] == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def generates(self) -> bool:
        status, body = self.request(
            "POST", "/v1/completions", {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "ignore_eos": True}
        )
        return status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def stop(self) -> None:
        """SIGTERM (uvicorn's graceful shutdown), SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_group(self.proc)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


# -- streaming clients --------------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed request: ``error`` says what went wrong (None: complete, or dropped on purpose)."""

    error: str | None = None
    tokens: int = 0
    seconds: float = 0.0
    dropped: bool = False
    gap: float = 0.0  # the longest pause between two events


def stream(port: int, key: str, body: dict, *, drop_after: int | None = None, timeout: float = 120) -> Stream:
    """POST a streamed request and read it to ``[DONE]`` (or close the connection after ``drop_after`` events).
    Complete means: 200, ``text/event-stream``, JSON events without an error, the usage, then ``[DONE]``; with
    ``ignore_eos`` the usage must count exactly ``max_tokens``."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST",
            path,
            json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        response = conn.getresponse()
        if response.status != 200 or not response.getheader("content-type", "").startswith("text/event-stream"):
            return Stream(f"HTTP {response.status}: {response.read()[:200]!r}")
        usage, events, last, gap = None, 0, None, 0.0
        for line in response:
            if not line.strip():
                continue
            now = time.monotonic()
            last, gap = now, max(gap, now - (last or now))
            if line.strip() == b"data: [DONE]":
                return _finished(body, usage, now - started, gap)
            payload = json.loads(line.removeprefix(b"data: "))
            if "error" in payload:
                return Stream(f"error event: {payload['error']['message']}", gap=gap)
            usage = payload.get("usage") or usage
            events += 1
            if drop_after is not None and events >= drop_after:
                return Stream(dropped=True)
        return Stream(f"the stream ended without [DONE] after {events} events")
    except (OSError, ValueError) as exc:
        return Stream(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _finished(body: dict, usage: dict | None, seconds: float, gap: float) -> Stream:
    if usage is None:
        return Stream("no usage chunk before [DONE]")
    if body.get("ignore_eos") and usage["completion_tokens"] != body["max_tokens"]:
        return Stream(f"{usage['completion_tokens']} tokens streamed, {body['max_tokens']} asked")
    return Stream(tokens=usage["completion_tokens"], seconds=seconds, gap=gap)


def random_request(rng: random.Random, max_tokens: tuple[int, int]) -> dict:
    """A chat or completion request of ``max_tokens`` tokens exactly (``ignore_eos``), sampled or greedy."""
    body = {
        "model": MODEL,
        "max_tokens": rng.randint(*max_tokens),
        "ignore_eos": True,
        "temperature": rng.choice([0, 0.7, 1.0]),
        "seed": rng.randrange(1 << 30),
    }
    prompt = rng.choice(PROMPTS)
    return (
        {**body, "messages": [{"role": "user", "content": prompt}]}
        if rng.random() < 0.5
        else {**body, "prompt": prompt}
    )


@dataclass
class Load:
    """What a load run saw. Dropped streams are not errors; the RSS samples are (seconds, MB)."""

    requests: int = 0
    tokens: int = 0
    dropped: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # each complete stream's longest pause between events
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)

    def rss_growth(self, warmup: float) -> tuple[float, float]:
        """(RSS at the end of the warm-up, RSS at the end) in MB: the median of three samples each."""
        after = [mb for t, mb in self.rss if t >= warmup]
        warm, end = after[:3], after[-3:]
        return sorted(warm)[len(warm) // 2], sorted(end)[len(end) // 2]

    def summary(self, warmup: float) -> str:
        ordered = sorted(self.latencies) or [0.0]
        p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        warm, end = self.rss_growth(warmup)
        return (
            f"{self.requests} requests ({self.dropped} dropped), {self.tokens / self.seconds:.0f} tok/s, latency "
            f"p50 {p50:.2f} s p99 {p99:.2f} s, RSS {self.rss[0][1]:.0f} MB at start, {warm:.0f} after warm-up, "
            f"{end:.0f} at end ({(end - warm) / warm:+.1%})"
        )


def run_load(
    server: Server,
    clients: int,
    seconds: float,
    *,
    seed: int = 0,
    drop_share: float = 0.0,
    max_tokens: tuple[int, int] = (8, 32),
) -> Load:
    """``clients`` threads streaming requests back to back for ``seconds`` (a share dropped after 1-3 events),
    the server's RSS sampled every half second. Requests under way at the end run to completion."""
    result, lock = Load(), threading.Lock()
    started = time.monotonic()
    deadline = started + seconds
    done = threading.Event()

    def client(number: int) -> None:
        rng = random.Random(seed * 10_000 + number)
        while time.monotonic() < deadline:
            drop = rng.randint(1, 3) if rng.random() < drop_share else None
            outcome = stream(server.port, server.key, random_request(rng, max_tokens), drop_after=drop)
            with lock:
                result.requests += 1
                result.dropped += outcome.dropped
                if outcome.error:
                    result.errors.append(outcome.error)
                elif not outcome.dropped:
                    result.tokens += outcome.tokens
                    result.latencies.append(outcome.seconds)
                    result.gaps.append(outcome.gap)

    def sample_rss() -> None:
        while not done.wait(0.5):
            result.rss.append((time.monotonic() - started, server.rss_mb()))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    done.set()
    sampler.join()
    return result


# -- schemathesis ---------------------------------------------------------------------------------------


def fuzz_api(url: str, key: str, *, examples: int, seed: int) -> tuple[int, list[str]]:
    """Run schemathesis on the server's OpenAPI description (coverage then fuzzing phase, every check but
    positive_data_acceptance), reproducibly for a ``seed``: (requests sent, failures described)."""
    import schemathesis
    from schemathesis.engine import events

    config = schemathesis.Config.from_dict(
        {
            "seed": seed,
            "workers": 1,
            "request-timeout": 60,
            "auth": {"openapi": {"bearer": {"bearer": key}}},
            "checks": {"positive_data_acceptance": {"enabled": False}},
            "generation": {"max-examples": examples},
            "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
        }
    )
    schema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", headers={"Authorization": f"Bearer {key}"}, config=config
    )
    sent, failures = 0, []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            sent += len(event.recorder.interactions)
            failures += [
                f"{event.recorder.label}: {check.name}: {_first_line(check)}"
                for checks in event.recorder.checks.values()
                for check in checks
                if check.status.name == "FAILURE"
            ]
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"schemathesis error: {getattr(event, 'value', None) or event.exception}")
    return sent, failures


def _first_line(check) -> str:
    failure = check.failure_info.failure if check.failure_info else None
    return (getattr(failure, "title", None) or str(failure)).splitlines()[0] if failure else "failed"


# -- hostile requests ---------------------------------------------------------------------------------


@dataclass
class Probe:
    """A raw HTTP request and the status it must get; ``app`` says the answer is the app's (an OpenAI error
    body), not the HTTP server's refusal of something that is not HTTP."""

    name: str
    expected: int
    raw: bytes
    app: bool = True


def raw_request(
    method: str, path: str, body: bytes = b"", headers: dict | None = None, key: str | None = None
) -> bytes:
    """The bytes of an HTTP/1.1 request (Content-Length from the body unless ``headers`` set it)."""
    headers = {
        "Host": "127.0.0.1",
        "Connection": "close",
        **({"Content-Type": "application/json"} if body else {}),
        **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {}),
    }
    headers.setdefault("Content-Length", str(len(body)))
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


def chunked_over_limit(key: str, filler: bytes = b"x") -> bytes:
    """A completion request with a chunked body (no Content-Length) one byte over the limit, in 4 KiB chunks of
    ``filler``. The server reads it all before it refuses it, so the answer is not lost to a reset."""
    body, chunk = b"", (filler * 4096)[:4096]
    for start in range(0, MAX_BODY + 1, len(chunk)):
        piece = chunk[: min(len(chunk), MAX_BODY + 1 - start)]
        body += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    head = raw_request(
        "POST", "/v1/completions", key=key, headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"}
    )
    return head.replace(b"Content-Length: 0\r\n", b"") + body + b"0\r\n\r\n"


def hostile_probes(key: str = KEY) -> list[Probe]:
    """Requests a server with the API key ``key`` and the limits :class:`Server` sets must refuse, with the
    status each must get."""

    def raw(method: str, path: str, body: bytes = b"", headers: dict | None = None, auth: str | None = key) -> bytes:
        return raw_request(method, path, body, headers, auth)

    def post(fields: dict, path: str = "/v1/completions") -> bytes:
        base = (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            if "chat" in path
            else {"model": MODEL, "prompt": "hi"}
        )
        return raw("POST", path, json.dumps({**base, **fields}).encode())

    deep = b'{"model":"tiny","prompt":"x","user":' + b"[" * 5000 + b"]" * 5000 + b"}"
    return [
        *[
            Probe(f"no key: {m} {p}", 401, raw(m, p, auth=None))
            for m, p in [
                ("GET", "/v1/models"),
                ("GET", f"/v1/models/{MODEL}"),
                ("POST", "/v1/completions"),
                ("POST", "/v1/chat/completions"),
                ("GET", "/metrics"),
                ("GET", "/openapi.json"),
                ("GET", "/docs"),
                ("GET", "/no/such/route"),
            ]
        ],
        Probe("wrong key", 401, raw("GET", "/v1/models", auth=key + "x")),
        Probe(
            "key of another scheme", 401, raw("GET", "/v1/models", headers={"Authorization": f"Basic {key}"}, auth=None)
        ),
        Probe("key in the query string only", 401, raw("GET", f"/v1/models?api_key={key}", auth=None)),
        Probe(
            "no key, oversized body",
            401,
            raw("POST", "/v1/completions", headers={"Content-Length": "999999999"}, auth=None),
        ),
        Probe(
            "body over the limit (declared, not sent)",
            413,
            raw(
                "POST",
                "/v1/completions",
                headers={"Content-Length": str(10 * MAX_BODY), "Content-Type": "application/json"},
            ),
        ),
        Probe("chunked body over the limit", 413, chunked_over_limit(key)),
        Probe("malformed JSON", 400, raw("POST", "/v1/completions", b'{"model": "tiny", "prompt": ')),
        Probe(
            "not UTF-8", 400, raw("POST", "/v1/completions", '{"model": "tiny", "prompt": "café"}'.encode("latin-1"))
        ),
        Probe(
            "Content-Type text/plain",
            415,
            raw("POST", "/v1/completions", b'{"model":"tiny","prompt":"hi"}', headers={"Content-Type": "text/plain"}),
        ),
        Probe(
            "form-encoded body",
            415,
            raw(
                "POST",
                "/v1/completions",
                b"model=tiny&prompt=hi",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ),
        ),
        Probe("JSON array body", 400, raw("POST", "/v1/completions", b"[1, 2]")),
        Probe("empty body", 400, raw("POST", "/v1/completions", headers={"Content-Type": "application/json"})),
        Probe("JSON nested 5,000 deep", 400, raw("POST", "/v1/completions", deep)),
        Probe(
            "a 5,000-digit number",
            400,
            raw("POST", "/v1/completions", b'{"model":"tiny","prompt":"x","seed":' + b"9" * 5000 + b"}"),
        ),
        Probe("NaN", 400, raw("POST", "/v1/completions", b'{"model":"tiny","prompt":"x","temperature":NaN}')),
        Probe("Infinity", 400, raw("POST", "/v1/completions", b'{"model":"tiny","prompt":"x","top_p":Infinity}')),
        Probe("1e999", 400, raw("POST", "/v1/completions", b'{"model":"tiny","prompt":"x","max_tokens":1e999}')),
        Probe(
            "lone surrogate in the prompt", 400, raw("POST", "/v1/completions", b'{"model":"tiny","prompt":"x\\ud800"}')
        ),
        Probe("lone surrogate in the model", 400, raw("POST", "/v1/completions", b'{"model":"\\udfff","prompt":"x"}')),
        Probe("stream as a string", 400, post({"stream": "yes"})),
        Probe("n as a float", 400, post({"n": 2.0})),
        Probe("prompt as a number", 400, post({"prompt": 42})),
        Probe("messages as a string", 400, post({"messages": "hi"}, "/v1/chat/completions")),
        Probe("unknown role", 400, post({"messages": [{"role": "robot", "content": "hi"}]}, "/v1/chat/completions")),
        Probe(
            "image content part",
            400,
            post(
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
                "/v1/chat/completions",
            ),
        ),
        Probe("no messages", 400, post({"messages": []}, "/v1/chat/completions")),
        Probe("missing model", 400, raw("POST", "/v1/completions", b'{"prompt": "hi"}')),
        Probe("unknown model", 404, post({"model": "gpt-4"})),
        Probe("max_tokens over the limit", 400, post({"max_tokens": MAX_TOKENS + 1})),
        Probe(
            "max_completion_tokens over the limit",
            400,
            post({"max_completion_tokens": MAX_TOKENS + 1, "max_tokens": 4}, "/v1/chat/completions"),
        ),
        Probe("max_tokens 0", 400, post({"max_tokens": 0})),
        Probe(
            "prompt longer than the context",
            400,
            post({"prompt": " ".join(["sepsis"] * (CONTEXT + 20)), "max_tokens": 1}),
        ),
        Probe(
            "prompt plus max_tokens over the context",
            400,
            post({"prompt": " ".join(["sepsis"] * 100), "max_tokens": MAX_TOKENS}),
        ),
        Probe("token id outside the vocabulary", 400, post({"prompt": [1, 2, 10**9]})),
        Probe("negative token id", 400, post({"prompt": [-1]})),
        Probe("empty prompt", 400, post({"prompt": ""})),
        Probe("empty prompt list", 400, post({"prompt": []})),
        Probe("n 0", 400, post({"n": 0})),
        Probe("n 17", 400, post({"n": 17})),
        Probe("more prompts than the server holds", 400, post({"prompt": [[1]] * 500})),
        Probe("17 stop sequences", 400, post({"stop": [str(i) for i in range(17)]})),
        Probe("logit_bias", 400, post({"logit_bias": {"1": 100}})),
        Probe("logprobs over --max-logprobs", 400, post({"logprobs": 21})),
        Probe("temperature 3", 400, post({"temperature": 3})),
        Probe("top_p 0", 400, post({"top_p": 0})),
        Probe("seed over 64 bits", 400, post({"seed": 2**64})),
        Probe("stream_options without stream", 400, post({"stream_options": {"include_usage": True}})),
        Probe("GET on a POST route", 405, raw("GET", "/v1/completions")),
        Probe("not HTTP", 400, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", app=False),
        Probe("a 1 MiB header", 400, raw("GET", "/v1/models", headers={"X-Filler": "x" * (1 << 20)}), app=False),
    ]


def send_raw(port: int, raw: bytes, timeout: float = 30) -> tuple[int | None, bytes]:
    """Send bytes, read the answer until the server closes: (status or None, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(raw)
        except OSError:  # the server answered and closed before taking it all: read what it said
            pass
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except OSError:
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else None), body


def probe_problem(port: int, probe: Probe) -> str | None:
    """What is wrong with the server's answer to ``probe`` (None: refused as expected)."""
    status, body = send_raw(port, probe.raw)
    if status != probe.expected:
        return f"{probe.name}: got {status}, expected {probe.expected}: {body[:160]!r}"
    if probe.app and status >= 400:
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"{probe.name}: the {status} is not an OpenAI error body: {body[:160]!r}"
        if not message:
            return f"{probe.name}: the error says nothing"
    return None


# -- the scenarios ------------------------------------------------------------------------------------


def _model(ctx: Context) -> Path:
    if "server_model" not in ctx.cache:
        ctx.cache["server_model"] = tiny_model(ctx.work / "server" / "tiny-gpt2")
    return ctx.cache["server_model"]


def _server(ctx: Context, name: str, **kwargs) -> Server:
    log = ctx.work / "server" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return Server(_model(ctx), log, **kwargs)


def _healthy(server: Server) -> list[str]:
    """Problems left after a try: a dead server, requests still holding slots, a failed generation."""
    problems = []
    if server.proc.poll() is not None:
        return [f"the server died ({server.proc.returncode})"]
    if not server.wait_idle():
        problems.append(f"requests still running or queued {RELEASE_S:.0f} s after the clients left")
    if not server.generates():
        problems.append("the server no longer generates")
    return problems


def scenario_schemathesis(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_schemathesis")
    examples = 15 if ctx.quick else 100
    sent_total = []

    def one(i: int) -> tuple[bool, int, str]:
        with _server(ctx, f"schemathesis-{i}", max_batch=2, max_queue=4, **FUZZ_LIMITS) as server:
            sent, failures = fuzz_api(
                f"http://127.0.0.1:{server.port}", server.key, examples=examples, seed=ctx.seed + i
            )
            errors = server.server_errors()
            problems = failures + _healthy(server)
        row.server_errors += errors + len(failures)
        sent_total.append(sent)
        row.detail = f"{sum(sent_total)} requests ({examples} examples per operation and phase)"
        if errors:
            problems.append(f"{errors} answers were 5xx")
        return not problems, 0, "; ".join(problems[:5]) or f"{sent} requests, all answers as documented"

    return attempt(ctx, row, tries, one)


def scenario_load(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_load")
    clients, seconds = (16, 20) if ctx.quick else (48, 150)
    warmup = max(5.0, seconds * 0.2)

    def one(i: int) -> tuple[bool, int, str]:
        with _server(ctx, f"load-{i}", max_batch=8, max_queue=64) as server:
            load = run_load(server, clients, seconds, seed=ctx.seed + i)
            errors = server.server_errors()
            problems = [f"{len(load.errors)} failed streams, e.g. {load.errors[0]}"] if load.errors else []
            problems += _healthy(server)
        row.server_errors += errors + len(load.errors)
        warm, end = load.rss_growth(warmup)
        if end - warm > RSS_GROWTH_LIMIT * warm:
            problems.append(
                f"RSS grew from {warm:.0f} to {end:.0f} MB after the warm-up (limit +{RSS_GROWTH_LIMIT:.0%})"
            )
        if errors:
            problems.append(f"{errors} answers were 5xx")
        row.detail = f"{clients} clients for {seconds} s: {load.summary(warmup)}"
        return not problems, 0, "; ".join(problems) or load.summary(warmup)

    return attempt(ctx, row, tries, one)


def scenario_hostile(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_hostile")

    def one(i: int) -> tuple[bool, int, str]:
        probes = hostile_probes()
        random.Random(ctx.seed + i).shuffle(probes)
        with _server(ctx, f"hostile-{i}", max_batch=2, max_queue=4) as server:
            problems = [p for p in (probe_problem(server.port, probe) for probe in probes) if p]
            errors = server.server_errors()
            problems += _healthy(server)
        row.injected += len(probes)
        row.server_errors += errors
        if errors:
            problems.append(f"{errors} answers were 5xx")
        row.detail = f"{len(probes)} hostile requests per try (401, 413, 415, 400, 404, 405, not HTTP), in random order"
        return not problems, 0, "; ".join(problems[:5]) or f"{len(probes)} refused as expected"

    return attempt(ctx, row, tries, one)


def drop_waiting_client(port: int, key: str, body: dict, after: float) -> None:
    """Send a non-streamed request and close the connection ``after`` seconds later, before the answer."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(raw_request("POST", "/v1/completions", json.dumps(body).encode(), key=key))
        time.sleep(after)


def drop_clients(server: Server, streams: int, waiting: int, rng: random.Random) -> tuple[int, int]:
    """``streams`` clients that drop their stream after 1-5 events and ``waiting`` that abandon a plain request
    within half a second, all at once, each asking for ``MAX_TOKENS - 24`` tokens. Returns (tokens asked,
    tokens the server generated meanwhile)."""
    body = {"model": MODEL, "max_tokens": MAX_TOKENS - 24, "ignore_eos": True}
    before = server.metrics()["medfoundry_generation_tokens_total"]
    jobs = [
        (stream, (server.port, server.key, {**body, "prompt": rng.choice(PROMPTS)}), {"drop_after": rng.randint(1, 5)})
        for _ in range(streams)
    ]
    jobs += [
        (
            drop_waiting_client,
            (server.port, server.key, {**body, "prompt": rng.choice(PROMPTS)}, rng.uniform(0.05, 0.5)),
            {},
        )
        for _ in range(waiting)
    ]
    threads = [
        threading.Thread(target=function, args=args, kwargs=kwargs, daemon=True) for function, args, kwargs in jobs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.wait_idle()
    return len(jobs) * body["max_tokens"], int(server.metrics()["medfoundry_generation_tokens_total"] - before)


def scenario_disconnects(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_disconnects")
    streams = 12 if ctx.quick else 24

    def one(i: int) -> tuple[bool, int, str]:
        with _server(ctx, f"disconnects-{i}", max_batch=4, max_queue=32) as server:
            asked, generated = drop_clients(server, streams, streams // 2, random.Random(ctx.seed + i))
            problems = _healthy(server)
            errors = server.server_errors()
        row.injected += streams + streams // 2
        row.server_errors += errors
        if generated > asked / 2:  # else the requests may have run to their end, not been stopped
            problems.append(f"{generated} of the {asked} tokens asked were generated: the requests were not cut short")
        if errors:
            problems.append(f"{errors} answers were 5xx")
        row.detail = (
            f"{streams} streams dropped after 1-5 events and {streams // 2} plain requests abandoned per "
            f"try, {asked} tokens asked, {generated} generated before the slots were free (last try)"
        )
        return not problems, 0, "; ".join(problems) or f"{generated} of {asked} tokens generated before the drops"

    return attempt(ctx, row, tries, one)


def load_while(server: Server, clients: int, seconds: float, seed: int, action) -> tuple[Load, list]:
    """:func:`run_load` in a thread while ``action(rng)`` runs in this one, again and again until the load ends:
    (the load, what each action returned)."""
    loads, rng = [], random.Random(seed)
    loader = threading.Thread(target=lambda: loads.append(run_load(server, clients, seconds, seed=seed)), daemon=True)
    loader.start()
    results = []
    while loader.is_alive():
        results.append(action(rng))
    loader.join()
    return loads[0], results


def oom_request(server: Server, rng: random.Random) -> tuple[str, str | None]:
    """A streamed request that makes :data:`FAULTY_FORWARD`'s model fail: a long prompt (in its prefill) or a long
    generation (in a decode step). Returns (which, None when it ended with the error event of a failed step, else
    what it got)."""
    if rng.random() < 0.5:
        kind, body = "prefill", {"model": MODEL, "prompt": " ".join(["sepsis"] * 400), "max_tokens": 4}
    else:
        kind, body = "decode", {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": 300, "ignore_eos": True}
    outcome = stream(server.port, server.key, body, timeout=60)
    time.sleep(rng.uniform(0.2, 0.6))  # the load runs undisturbed in between
    return kind, None if (outcome.error or "").startswith(STEP_FAILED) else outcome.error or "it completed"


def scenario_forward_raises(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_forward_raises")
    clients, seconds = 8, (12 if ctx.quick else 40)

    def one(i: int) -> tuple[bool, int, str]:
        with _server(ctx, f"forward-raises-{i}", max_batch=8, faults=OOM_LIMITS) as server:
            load, outcomes = load_while(server, clients, seconds, ctx.seed + i, lambda rng: oom_request(server, rng))
            errors = server.server_errors()
            problems = _healthy(server)
        unexpected = [e for e in load.errors if not e.startswith(STEP_FAILED)]
        missed = [problem for _, problem in outcomes if problem is not None]
        casualties = len(load.errors) - len(unexpected)
        row.injected += len(outcomes)
        row.server_errors += errors + len(unexpected) + len(missed)
        if unexpected:
            problems.append(f"{len(unexpected)} streams ended otherwise than with an error, e.g. {unexpected[0]}")
        if missed:
            problems.append(f"{len(missed)} requests that made the model fail did not get its error: {missed[0]}")
        if errors:
            problems.append(f"{errors} answers were 5xx")
        if load.requests - len(load.errors) < load.requests / 4:
            problems.append(f"only {load.requests - len(load.errors)} of {load.requests} streams completed")
        kinds = [kind for kind, _ in outcomes]
        note = (
            f"{kinds.count('prefill')} prefills and {kinds.count('decode')} decode steps failed; {clients} clients "
            f"streamed {load.requests} requests, {casualties} ended by a failed step with its error event, the "
            "others complete"
        )
        row.detail = f"{clients} clients for {seconds} s with a model that fails on large inputs: {note} (last try)"
        return not problems, 0, "; ".join(problems[:5]) or note

    return attempt(ctx, row, tries, one)


def close_at_once(port: int, key: str, body: dict) -> None:
    """Send a streamed request and close the connection at once."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(raw_request("POST", path, json.dumps({**body, "stream": True}).encode(), key=key))


def scenario_disconnect_before_stream(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_disconnect_before_stream")
    slots, queue, bursts = 4, 8, (3 if ctx.quick else 10)

    def one(i: int) -> tuple[bool, int, str]:
        rng = random.Random(ctx.seed + i)
        problems, longest = [], 0.0
        with _server(ctx, f"disconnect-before-stream-{i}", max_batch=slots, max_queue=queue) as server:
            server.generates()  # warm: the first requests of a fresh server are slower to get through
            before = server.metrics()["medfoundry_generation_tokens_total"]
            for burst in range(bursts):
                bodies = [random_request(rng, (MAX_TOKENS - 24,) * 2) for _ in range(slots + queue)]
                threads = [threading.Thread(target=close_at_once, args=(server.port, server.key, b)) for b in bodies]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                time.sleep(0.2)  # the server has read them all
                waited = time.monotonic()
                if not server.wait_idle(IDLE_S):
                    problems.append(f"burst {burst + 1}: requests still running or queued {IDLE_S:.0f} s after")
                longest = max(longest, time.monotonic() - waited)
                if not server.generates():  # a 429 while the slots of the clients that left are busy
                    problems.append(f"burst {burst + 1}: the next client was not served")
            generated = int(server.metrics()["medfoundry_generation_tokens_total"] - before)
            errors = server.server_errors()
            problems += _healthy(server)
        asked = bursts * (slots + queue) * (MAX_TOKENS - 24)
        row.injected += bursts * (slots + queue)
        row.server_errors += errors
        if errors:
            problems.append(f"{errors} answers were 5xx")
        note = (
            f"{bursts} bursts of {slots + queue} streams closed at once: {generated} of {asked} tokens generated, "
            f"idle {longest + 0.2:.1f} s after a burst at most"
        )
        row.detail = f"{slots} slots, {queue} waiting places; {note} (last try)"
        return not problems, 0, "; ".join(problems[:5]) or note

    return attempt(ctx, row, tries, one)


def huge_request(server: Server, rng: random.Random) -> tuple[int, float]:
    """A completion or chat request with a 1 MiB prompt: (status, seconds to the answer)."""
    text = ("The patient presented with sepsis after 3 days. " * (MIB // 48))[: MIB - 200]
    body = (
        {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        if rng.random() < 0.5
        else {"model": MODEL, "prompt": text}
    )
    started = time.monotonic()
    status, _ = server.request("POST", "/v1/chat/completions" if "messages" in body else "/v1/completions", body)
    return status, time.monotonic() - started


def scenario_long_prompt_stall(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_long_prompt_stall")
    clients, seconds = 8, (10 if ctx.quick else 30)

    def one(i: int) -> tuple[bool, int, str]:
        with _server(ctx, f"long-prompt-{i}", max_batch=8, max_body=2 * MIB) as server:
            load, answers = load_while(server, clients, seconds, ctx.seed + i, lambda rng: huge_request(server, rng))
            errors = server.server_errors()
            problems = _healthy(server)
        stall = max(load.gaps, default=0.0)
        wrong = [status for status, _ in answers if status != 400]
        row.injected += len(answers)
        row.server_errors += errors + len(load.errors)
        if load.errors:
            problems.append(f"{len(load.errors)} failed streams, e.g. {load.errors[0]}")
        if wrong:
            problems.append(f"1 MiB prompts answered {sorted(set(wrong))}, not 400")
        if stall > STALL_LIMIT_S:
            problems.append(f"a stream paused {stall:.2f} s (limit {STALL_LIMIT_S} s)")
        if errors:
            problems.append(f"{errors} answers were 5xx")
        slowest = max((s for _, s in answers), default=0.0)
        note = (
            f"{len(answers)} prompts of 1 MiB refused (slowest answer {slowest:.2f} s) while {clients} clients "
            f"streamed {load.requests} requests; longest pause in a stream {stall:.2f} s"
        )
        row.detail = note + " (last try)"
        return not problems, 0, "; ".join(problems[:5]) or note

    return attempt(ctx, row, tries, one)


def guard_probes(allowed: str) -> list[Probe]:
    """What a server without a key must refuse from web pages (415, 421) and still answer (200); ``allowed`` is
    its --allowed-host."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()

    def post(headers: dict | None = None) -> bytes:
        return raw_request("POST", "/v1/completions", body, headers)

    foreign = ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "[::2]"]
    local = ["localhost", "localhost:8000", "127.0.0.1", "[::1]:8000", allowed, allowed.upper() + ":443"]
    return [
        *[
            Probe(f"POST as {kind}", 415, post({"Content-Type": kind}))
            for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x")
        ],
        Probe("POST without a Content-Type", 415, post().replace(b"Content-Type: application/json\r\n", b"")),
        *[Probe(f"POST for Host {host}", 421, post({"Host": host})) for host in foreign],
        *[
            Probe(f"GET for Host {host}", 421, raw_request("GET", "/v1/models", headers={"Host": host}))
            for host in foreign
        ],
        *[Probe(f"POST for Host {host}", 200, post({"Host": host})) for host in local],
    ]


def refused_start(ctx: Context, *args: str) -> str | None:
    """Why ``medfoundry serve`` with ``args`` did not refuse to start as it must (None: it refused)."""
    run = subprocess.run(
        medfoundry(*serve_args(_model(ctx), free_port(), *args)),
        cwd=REPO,
        env=SERVER_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode == 0:
        return f"{' '.join(args)}: it started"
    expected = "unrecognized arguments: --api-key" if "--api-key" in args else "--insecure-no-key"
    return None if expected in run.stderr else f"{' '.join(args)}: {run.stderr.strip()[-200:]}"


def scenario_no_key_guard(ctx: Context, tries: int) -> Row:
    row = Row("server", "server_no_key_guard")
    allowed = "medfoundry.lab.internal"

    def one(i: int) -> tuple[bool, int, str]:
        probes = guard_probes(allowed)
        random.Random(ctx.seed + i).shuffle(probes)
        with _server(
            ctx, f"no-key-{i}", key=None, max_batch=2, max_queue=4, options=("--allowed-host", allowed)
        ) as server:
            problems = [p for p in (probe_problem(server.port, probe) for probe in probes) if p]
            errors = server.server_errors()
            problems += _healthy(server)
        starts = [("--host", "0.0.0.0"), ("--host", "192.0.2.10"), ("--api-key", KEY)]
        problems += [p for p in (refused_start(ctx, *args) for args in starts) if p]
        row.injected += len(probes) + len(starts)
        row.server_errors += errors
        if errors:
            problems.append(f"{errors} answers were 5xx")
        note = (
            f"{len(probes)} requests (non-JSON bodies 415, foreign Hosts 421, local and allowed ones 200); "
            f"no key beyond loopback and --api-key refused at start"
        )
        row.detail = note
        return not problems, 0, "; ".join(problems[:5]) or note

    return attempt(ctx, row, tries, one)


SERVER_SCENARIOS = {  # name -> (scenario, tries with --quick, tries without)
    "server_schemathesis": (scenario_schemathesis, 1, 3),
    "server_load": (scenario_load, 1, 1),
    "server_hostile": (scenario_hostile, 1, 3),
    "server_disconnects": (scenario_disconnects, 1, 3),
    "server_forward_raises": (scenario_forward_raises, 1, 3),
    "server_disconnect_before_stream": (scenario_disconnect_before_stream, 1, 3),
    "server_long_prompt_stall": (scenario_long_prompt_stall, 1, 3),
    "server_no_key_guard": (scenario_no_key_guard, 1, 3),
}


def server_scenarios(ctx: Context) -> list[Row]:
    return run_scenarios(ctx, "server", SERVER_SCENARIOS)
