"""The daemon's listener: ``POST /webhooks/hub``, ``GET /health``, ``GET /metrics``.

The standard library's threading HTTP server, as the mirror uses: three small routes at a few
requests a minute need no ASGI stack, and the daemon stays free of FastAPI (sync/ never imports
server/). Metrics live in their own ``CollectorRegistry``; the commits are read at scrape time.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync.errors import ConfigError
from sync.webhooks import SECRET_HEADER, HubEvent, PayloadError, check_secret, parse_event

log = logging.getLogger("hubserve.daemon")
MAX_BODY = 1 << 20  # Hub payloads are a few KiB


class DaemonView(Protocol):
    """What the listener needs from the daemon (called from the listener's threads)."""

    def health(self) -> dict[str, Any]: ...

    def webhook_secret(self) -> str | None: ...

    def on_webhook(self, event: HubEvent) -> dict[str, Any]: ...


class DaemonMetrics:
    """Prometheus metrics of one daemon; ``locked``/``served`` give {model: commit} at scrape time."""

    def __init__(self, locked: Callable[[], dict[str, str]], served: Callable[[], dict[str, str]] | None) -> None:
        self.registry = CollectorRegistry()
        self.last_success = Gauge(
            "hubserve_daemon_last_success_timestamp_seconds",
            "Unix time of the last reconcile in which every model synced.",
            registry=self.registry,
        )
        self.bytes = Counter(
            "hubserve_daemon_downloaded_bytes", "Bytes downloaded and verified.", registry=self.registry
        )
        self.files = Counter(
            "hubserve_daemon_downloaded_files", "Files downloaded and verified.", registry=self.registry
        )
        self.failures = Counter(
            "hubserve_daemon_failures", "Failed model syncs and reconciles.", ["model"], registry=self.registry
        )
        self.reconciles = Counter("hubserve_daemon_reconciles", "Reconciles run.", ["trigger"], registry=self.registry)
        self.registry.register(_CommitCollector(locked, served))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CommitCollector(Collector):
    def __init__(self, locked: Callable[[], dict[str, str]], served: Callable[[], dict[str, str]] | None) -> None:
        self._locked, self._served = locked, served

    def collect(self) -> Iterable[Metric]:
        yield _info("hubserve_daemon_locked_commit", "The commit models.lock pins (value 1).", self._locked())
        if self._served is not None:
            yield _info("hubserve_daemon_served_commit", "The commit the server serves (value 1).", self._served())


def _info(name: str, doc: str, commits: dict[str, str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["model", "commit"])
    for model, commit in sorted(commits.items()):
        family.add_metric([model, commit], 1)
    return family


def served_commits(server: str, timeout: float = 2.0) -> dict[str, str]:
    """``GET {server}/health`` -> {model: commit}; empty when the server cannot be reached."""
    try:
        resp = httpx.get(f"{server.rstrip('/')}/health", timeout=timeout)
        models = resp.json().get("models", {})
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        log.debug("server %s unreachable for the served-commit metric: %s", server, e)
        return {}
    if not isinstance(models, dict):
        return {}
    return {
        str(name): m["commit"]
        for name, m in models.items()
        if isinstance(m, dict) and isinstance(m.get("commit"), str)
    }


class DaemonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserve-daemon"
    timeout = 30
    server: DaemonServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: webhook outcomes are logged by the daemon, without headers (no secret in logs)."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, json.dumps(self.server.view.health()).encode(), "application/json")
        elif path == "/metrics":
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        else:
            self._json(404, {"error": f"no route GET {path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/webhooks/hub":
            self._json(404, {"error": f"no route POST {path}"})
            return
        body = self._body()
        if body is None:
            return
        refused = check_secret(self.headers.get(SECRET_HEADER), self.server.view.webhook_secret())
        if refused is not None:
            log.warning("webhook refused: %s secret", "missing" if refused == 401 else "wrong")
            self._json(refused, {"error": f"{'missing' if refused == 401 else 'wrong'} {SECRET_HEADER}"})
            return
        try:
            event = parse_event(body)
        except PayloadError as e:
            self._json(400, {"error": str(e)})
            return
        self._json(202, self.server.view.on_webhook(event))

    def _body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(411, {"error": "Content-Length required"})
            return None
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._json(413, {"error": f"body over {MAX_BODY} bytes"})
            return None
        return self.rfile.read(length)

    def _json(self, status: int, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class DaemonServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], view: DaemonView, metrics: DaemonMetrics) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.view, self.metrics = view, metrics
        super().__init__(address, DaemonHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("listener: connection from %s ended with an error", client_address, exc_info=True)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8091`` for IPv6) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8091")
    return host.strip("[]"), int(port)

