"""The engine on a background thread, fed by the server's event loop.

Model steps run for tens of milliseconds with the GIL mostly released, so they get their own thread and
the asyncio loop stays free to accept connections and stream. Requests are admitted all-or-nothing
against a bound on requests in flight (the batch slots plus ``max_queue`` waiting): a full server
answers 429 at once instead of letting latency grow without limit. Every output is handed to the
request's sink (for the server, a ``call_soon_threadsafe`` into the handler's queue).

Every request submitted gets a final output, whatever happens: a request older than ``request_timeout``
(queueing included) is cancelled with the finish reason "timeout", and a step that raises (out of memory
on a large prefill, say) ends every request in flight with "error", each freeing its place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine, Output, Request
from medfoundry.generation.logprobs import LogprobOptions
from medfoundry.serve.config import DEFAULT_REQUEST_TIMEOUT
from medfoundry.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)
Sink = Callable[[Output], None]
Job = tuple[list[int], SamplingConfig, Sink, LogprobOptions | None]  # prompt ids, sampling, sink, log-probabilities


class QueueFull(Exception):
    """No room for the request: every slot is busy and the waiting queue is full."""


class EngineWorker:
    def __init__(self, engine: Engine, *, max_queue: int = 64, request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.engine = engine
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.metrics = ServerMetrics(
            queue_depth=lambda: len(engine.waiting), running=lambda: len(engine.running), slots=engine.max_batch
        )
        self._inflight: dict[str, tuple[Request, Sink]] = {}  # in submission order: the oldest first
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medfoundry-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def capacity(self) -> int:
        """Generations in flight at most: the batch slots plus the waiting places."""
        return self.engine.max_batch + self.max_queue

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> list[Request]:
        """Queue several generations (the choices of one HTTP request) together, or none: ``QueueFull``."""
        with self._wake:
            in_flight = len(self.engine.running) + len(self.engine.waiting)
            if in_flight + len(jobs) > self.capacity:
                raise QueueFull(
                    f"server busy: {in_flight} generations in flight, {len(jobs)} more asked, room for "
                    f"{self.capacity} ({self.engine.max_batch} running, {self.max_queue} waiting); retry later"
                )
            requests = []
            for ids, params, sink, logprobs in jobs:
                request = self.engine.add_request(ids, params, logprobs=logprobs)
                self._inflight[request.id] = (request, sink)
                requests.append(request)
            self._wake.notify()
        return requests

    def cancel(self, requests: list[Request]) -> None:
        """Stop requests whose client went away; their slots free at the next step."""
        for request in requests:
            if request.finish_reason is None:
                self.engine.cancel(request)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_work:
                    self._wake.wait()
                if self._stopping:
                    return
                self._expire()
            try:
                outputs = self.engine.step()
            except Exception:  # a failed step leaves no trustworthy cache: end everything, keep serving
                log.exception("engine step failed; ending every request in flight with an error")
                outputs = self._fail_all()
            self._dispatch(outputs)

    def _expire(self) -> None:
        """Cancel the requests older than ``request_timeout``: they end with "timeout" at the next step."""
        cutoff = time.monotonic() - self.request_timeout
        for request, _sink in self._inflight.values():
            if request.arrived > cutoff:
                break
            if request.finish_reason is None:
                self.engine.cancel(request, "timeout")

    def _fail_all(self) -> list[Output]:
        """The final "error" output of every request in flight, after a failed step. The engine's queues are
        emptied; the requests that the step had already taken out of them (finished by their prefill, or
        cancelled) are ended too, as their outputs were lost with the step."""
        with self._wake:
            self.engine.abort_all("error")
            requests = [request for request, _sink in self._inflight.values()]
        for request in requests:
            request.finish_reason = "error"
        return [Output(r.id, "", [], "error", len(r.prompt_ids), len(r.output_ids)) for r in requests]

    def _dispatch(self, outputs: list[Output]) -> None:
        now = time.monotonic()
        for out in outputs:
            request, sink = self._inflight[out.request_id]
            if out.token_ids:
                self.metrics.generation_tokens.inc(len(out.token_ids))
                if out.completion_tokens == len(out.token_ids):
                    self.metrics.prompt_tokens.inc(out.prompt_tokens)
                    self.metrics.first_token.observe(now - request.arrived)
            if out.finish_reason is not None:
                del self._inflight[out.request_id]
            sink(out)
