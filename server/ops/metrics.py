"""Prometheus metrics: per request (count, success, failure, duration, time to first byte and token, inter-token
latency, queue time, tokens, key name) by route and model, and per model at scrape time (engine state, in-flight
and queued requests, restarts). One CollectorRegistry per app; the gateway middleware observes each request."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engines.base import EngineState
from server.ops.context import RequestContext
from server.registry import Registry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """The app's metrics. A request's model label comes from its RequestContext (set by the model lookup)."""

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

        self.ttft = Histogram(
            "hubserve_time_to_first_token_seconds",
            "Streamed answers: time until the first event (the first token).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "hubserve_inter_token_latency_seconds",
            "Streamed answers: time between two events (tokens).",
            ("model",),
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "hubserve_queue_seconds",
            "Time a request waited for an in-flight slot (or a revision swap).",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens_in = Counter("hubserve_tokens_in", "Prompt tokens.", ("model",), registry=self.registry)
        self.tokens_out = Counter("hubserve_tokens_out", "Generated tokens.", ("model",), registry=self.registry)
        self.key_requests = Counter(
            "hubserve_key_requests", "Requests by API key name.", ("key", "model", "status"), registry=self.registry
        )
        self.fallbacks = Counter(
            "hubserve_fallbacks", "Requests for an alias passed on from one of its models to the next, and why.",
            ("alias", "from_model", "to_model", "reason"), registry=self.registry,
        )

        self.cache_requests = Counter(
            "hubserve_cache_requests", "Response cache lookups (cacheable requests of models with cache = true).",
            ("model", "result"), registry=self.registry,
        )

    def watch_engines(self, registry_fn: Callable[[], Registry | None]) -> None:
        self.registry.register(EngineCollector(registry_fn))

    def observe_request(
        self,
        route: str,
        model: str,
        status: int,
        ttfb: float | None,
        duration: float,
        ttft: float | None,
        gaps: list[float],
        ctx: RequestContext,
        key: str | None,
    ) -> None:
        self.observe(route, model, status, ttfb, duration)
        if ttft is not None:
            self.ttft.labels(route, model).observe(ttft)
        for gap in gaps:
            self.itl.labels(model).observe(gap)
        if model:
            self.queue_time.labels(model).observe(ctx.queue_s)
        if ctx.tokens_in:
            self.tokens_in.labels(model).inc(ctx.tokens_in)
        if ctx.tokens_out:
            self.tokens_out.labels(model).inc(ctx.tokens_out)
        if key is not None:
            self.key_requests.labels(key, model, str(status)).inc()

    def observe_fallback(self, alias: str, from_model: str, to_model: str, reason: str) -> None:
        self.fallbacks.labels(alias, from_model, to_model, reason).inc()

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
        waiting = GaugeMetricFamily(
            "hubserve_queue_depth", "Requests waiting for a slot or a swap per model.", labels=["model"]
        )
        limit = GaugeMetricFamily("hubserve_max_concurrent_requests", "In-flight limit per model.", labels=["model"])
        restarts = CounterMetricFamily("hubserve_engine_restarts", "Engine restarts after a crash.", labels=["model"])
        registry = self._registry_fn()
        for name, served in (registry.served if registry else {}).items():
            engine = served.engine
            waiting.add_metric([name], served.queued)
            for s in EngineState:
                state.add_metric([name, s.value], 1.0 if engine.state is s else 0.0)
            queue.add_metric([name], engine.in_flight)
            limit.add_metric([name], engine.max_in_flight)
            restarts.add_metric([name], engine.restarts)
        yield from (state, queue, waiting, limit, restarts)
