"""Prometheus metrics for `GET /api/v1/metrics`.

Requests by route template and status, request and future latency, queue depth (futures pending,
requests held back by seq_id ordering), sessions and models, and the engine's own counters
(`ServiceClient.metrics()`: compilations per op, live adapters, sampler snapshots, batches run,
queued requests) as gauges labelled by base model. Each app gets its own registry, so several
servers in one process (tests) do not collide.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector:
    """Reads the engine counters at scrape time."""

    def __init__(self, read: Callable[[], dict[str, dict[str, float]]]):
        self.read = read

    def collect(self) -> Iterable[Any]:
        families: dict[str, GaugeMetricFamily] = {}
        for base_model, row in self.read().items():
            for key, value in row.items():
                name = "tinker_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
                family = families.setdefault(name, GaugeMetricFamily(name, f"engine counter {key}",
                                                                     labels=["base_model"]))
                family.add_metric([base_model], value)
        return list(families.values())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tinker_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("tinker_http_request_seconds", "HTTP request latency", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.future_seconds = Histogram("tinker_future_seconds", "time from request to result, by kind",
                                        ["kind", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.futures_pending = Gauge("tinker_futures_pending", "futures not finished yet", registry=r)
        self.seq_waiting = Gauge("tinker_requests_waiting_for_seq", "requests held for a missing lower seq_id",
                                 registry=r)
        self.sessions_active = Gauge("tinker_sessions_active", "sessions not finished", registry=r)
        self.models_live = Gauge("tinker_models_live", "training models with an adapter on the engine", registry=r)

    def watch_engine(self, read: Callable[[], dict[str, dict[str, float]]]) -> None:
        self.registry.register(_EngineCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
