"""Prometheus metrics: per request (count, success, failure, duration, time to first byte) by route and model,
and per engine at scrape time (state, in-flight requests, restarts). One CollectorRegistry per app."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engines.base import EngineState
from server.registry import Registry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SKIP_PATHS = frozenset({"/metrics", "/health", "/ready"})


class Metrics:
    """The app's metrics. Serving code labels a request with its model by setting ``request.state.model``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("route", "model")
        self.requests = Counter(
            "hubserve_requests", "Requests answered, by status code.", (*labels, "status"), registry=self.registry
        )
        self.success = Counter(
            "hubserve_request_success", "Requests answered with 2xx.", labels, registry=self.registry
        )
        self.failure = Counter(
            "hubserve_request_failure",
            "Requests answered with 4xx or 5xx.",
            (*labels, "status"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "hubserve_request_duration_seconds",
            "Time until the last byte of the answer.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "hubserve_time_to_first_byte_seconds",
            "Time until the first byte of the answer body.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch_engines(self, registry_fn: Callable[[], Registry | None]) -> None:
        self.registry.register(EngineCollector(registry_fn))

    def observe(self, route: str, model: str, status: int, ttfb: float | None, duration: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        if status < 400:
            self.success.labels(route, model).inc()
        else:
            self.failure.labels(route, model, str(status)).inc()
        if ttfb is not None:
            self.ttfb.labels(route, model).observe(ttfb)
        self.duration.labels(route, model).observe(duration)


class EngineCollector(Collector):
    """Engine gauges read at scrape time, so they are never stale."""

    def __init__(self, registry_fn: Callable[[], Registry | None]) -> None:
        self._registry_fn = registry_fn

    def collect(self) -> Iterable[Any]:
        state = GaugeMetricFamily(
            "hubserve_engine_state", "1 for the engine's current state.", labels=["model", "state"]
        )
        queue = GaugeMetricFamily("hubserve_queue_size", "Requests in flight per model.", labels=["model"])
        limit = GaugeMetricFamily("hubserve_max_concurrent_requests", "In-flight limit per model.", labels=["model"])
        restarts = CounterMetricFamily("hubserve_engine_restarts", "Engine restarts after a crash.", labels=["model"])
        registry = self._registry_fn()
        for name, engine in (registry.engines if registry else {}).items():
            for s in EngineState:
                state.add_metric([name, s.value], 1.0 if engine.state is s else 0.0)
            queue.add_metric([name], engine.in_flight)
            limit.add_metric([name], engine.max_in_flight)
            restarts.add_metric([name], engine.restarts)
        yield from (state, queue, limit, restarts)


class MetricsMiddleware:
    """Pure ASGI middleware (never buffers a stream): times each request to its first and last body byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in SKIP_PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        first: float | None = None
        done = False

        async def timed_send(message: Message) -> None:
            nonlocal status, first, done
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if first is None and message.get("body"):
                    first = time.perf_counter() - start
                if not message.get("more_body", False):
                    done = True
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            done, status = True, 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            model = str(scope.get("state", {}).get("model") or "")
            # 499 (nginx's "client closed request"): the answer never finished, e.g. a client left mid-stream
            self.metrics.observe(route, model, status if done else 499, first, time.perf_counter() - start)
