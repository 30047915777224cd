"""Prometheus metrics in the text exposition format, without ``prometheus_client``.

The server needs a handful of counters, gauges read at scrape time and latency histograms; writing
them out is a few lines, and one dependency fewer for every install.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(pairs: tuple[tuple[str, str], ...], extra: str = "") -> str:
    items = [f'{k}="{_escape(v)}"' for k, v in pairs] + ([extra] if extra else [])
    return "{" + ",".join(items) + "}" if items else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            rows = sorted(self.values.items()) or [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(key)} {_number(v)}" for key, v in rows]


class Gauge(_Metric):
    """A value read when scraped (queue depth, running requests)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(name, help_text)
        self.buckets = buckets
        self.series: dict[tuple, list] = {}  # labels -> [counts per bucket..., +Inf count, sum]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self.series.setdefault(key, [0] * (len(self.buckets) + 1) + [0.0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[len(self.buckets)] += 1
            series[-1] += value

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted(self.series.items())
        for key, series in items:
            for bound, count in zip((*map(_number, self.buckets), "+Inf"), series):
                le = 'le="' + bound + '"'
                lines.append(f"{self.name}_bucket{_labels(key, le)} {count}")
            lines.append(f"{self.name}_count{_labels(key)} {series[len(self.buckets)]}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(series[-1])}")
        return lines


class ServerMetrics:
    """Everything ``/metrics`` reports."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float], slots: int):
        self.requests = Counter("medfoundry_requests_total", "HTTP requests by endpoint and status code")
        self.prompt_tokens = Counter("medfoundry_prompt_tokens_total", "prompt tokens prefilled")
        self.generation_tokens = Counter("medfoundry_generation_tokens_total", "tokens generated")
        self.latency = Histogram("medfoundry_request_duration_seconds", "time from request to last token, by endpoint")
        self.first_token = Histogram("medfoundry_time_to_first_token_seconds", "time from request to first token")
        self.metrics: list[_Metric] = [
            self.requests,
            self.prompt_tokens,
            self.generation_tokens,
            self.latency,
            self.first_token,
            Gauge("medfoundry_queue_depth", "requests waiting for a batch slot", queue_depth),
            Gauge("medfoundry_running_requests", "requests generating", running),
            Gauge("medfoundry_batch_slots", "requests the engine runs at once", lambda: slots),
        ]

    def render(self) -> str:
        return "\n".join(line for metric in self.metrics for line in metric.render()) + "\n"
