"""The gateway's own Prometheus metrics, rendered in the text exposition format.

Labels are server names the gateway knows, never a client's arbitrary ``model`` string
(a request for an unknown model counts under ``model="unknown"``), so the label set stays
bounded.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

PREFIX = "cmw_vllm_gateway_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)
START_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Histogram:
    """A Prometheus histogram per label value."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        """Count one observation."""
        counts = self.counts.get(label)
        if counts is None:
            counts = self.counts[label] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[label] += value

    def render(self, name: str, help_text: str, label_name: str) -> list[str]:
        """Exposition lines (cumulative buckets, sum, count)."""
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for label, counts in sorted(self.counts.items()):
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{name}_bucket{{{label_name}="{label}",le="{le}"}} {running}')
            lines.append(f'{name}_sum{{{label_name}="{label}"}} {self.sums[label]:.6f}')
            lines.append(f'{name}_count{{{label_name}="{label}"}} {running}')
        return lines


class Metrics:
    """Counters, gauges and histograms of one gateway."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.start_duration = Histogram(START_BUCKETS)
        self.starts: dict[str, int] = defaultdict(int)
        self.start_failures: dict[str, int] = defaultdict(int)
        self.stops: dict[tuple[str, str], int] = defaultdict(int)
        self.evictions: dict[str, int] = defaultdict(int)
        self.rejected: dict[tuple[str, str], int] = defaultdict(int)

    def request_done(self, model: str, code: int, seconds: float) -> None:
        """Count a finished request and its latency (to the end of the response)."""
        self.requests[(model, code)] += 1
        self.latency.observe(model, seconds)

    def render(self, in_flight: dict[str, int], waiting: dict[str, int]) -> str:
        """The whole exposition text, with the live gauges given by the caller."""
        lines: list[str] = []

        def counter(name: str, help_text: str, values: dict, labels: Callable) -> None:
            full = PREFIX + name
            lines.extend([f"# HELP {full} {help_text}", f"# TYPE {full} counter"])
            for key, value in sorted(values.items()):
                lines.append(f"{full}{{{labels(key)}}} {value}")

        def gauge(name: str, help_text: str, values: dict[str, int]) -> None:
            full = PREFIX + name
            lines.extend([f"# HELP {full} {help_text}", f"# TYPE {full} gauge"])
            for key, value in sorted(values.items()):
                lines.append(f'{full}{{model="{key}"}} {value}')

        counter("requests_total", "Requests answered, by model and HTTP status.",
                self.requests, lambda k: f'model="{k[0]}",code="{k[1]}"')
        lines += self.latency.render(PREFIX + "request_duration_seconds",
                                     "Seconds from request to the end of the response.",
                                     "model")
        gauge("in_flight_requests", "Requests being served now.", in_flight)
        gauge("queued_requests", "Requests waiting for their model to start.", waiting)
        counter("starts_total", "Servers started on demand.", self.starts,
                lambda k: f'model="{k}"')
        counter("start_failures_total", "Starts that failed.", self.start_failures,
                lambda k: f'model="{k}"')
        lines += self.start_duration.render(PREFIX + "start_duration_seconds",
                                            "Seconds an on-demand start took.", "model")
        counter("stops_total", "Servers stopped by the gateway, by reason.", self.stops,
                lambda k: f'model="{k[0]}",reason="{k[1]}"')
        counter("evictions_total", "Servers stopped to make room for another model.",
                self.evictions, lambda k: f'model="{k}"')
        counter("rejected_total", "Requests refused before reaching a server, by reason.",
                self.rejected, lambda k: f'model="{k[0]}",reason="{k[1]}"')
        return "\n".join(lines) + "\n"
