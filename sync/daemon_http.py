"""The daemon's listener: ``POST /webhooks/hub``, ``GET /health``, ``GET /metrics``.

The standard library's threading HTTP server, bounded as the mirror's is (sync/httpbounds.py): three
small routes at a few requests a minute need no ASGI stack, and the daemon stays free of FastAPI (sync/
never imports server/). Metrics live in their own ``CollectorRegistry``; the commits are read at scrape
time. ``DaemonAccess`` says who may read /health and /metrics.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync.errors import ConfigError
from sync.httpbounds import BodyRefused, BoundedHandler, BoundedServer, Limits
from sync.paths import printable
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


ENV_PREFIX = "HUBSERVE_DAEMON_"  # also HUBSERVE_DAEMON_MAX_CONNECTIONS, _HEADER_TIMEOUT, ... (httpbounds.Limits)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(f"{ENV_PREFIX}{name}", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class DaemonAccess:
    """Who may read ``/health`` and ``/metrics``, and whether the listener may face other machines.

    With ``$HUBSERVE_DAEMON_TOKEN`` set both routes need ``Authorization: Bearer <token>`` unless opened
    one by one (``$HUBSERVE_DAEMON_OPEN_HEALTH``, ``$HUBSERVE_DAEMON_OPEN_METRICS``, e.g. for a probe); with
    no token they are open, so a non-loopback ``listen`` is refused unless ``$HUBSERVE_DAEMON_INSECURE_PUBLIC``.
    The webhook route has its own secret either way. The Hub's webhook secret is not a read credential:
    it is configured on the Hub's side, and a scraper or probe should not hold it.
    """

    token: str | None = None
    open_health: bool = False
    open_metrics: bool = False
    insecure_public: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DaemonAccess:
        env = os.environ if env is None else env
        return cls(
            token=env.get(f"{ENV_PREFIX}TOKEN") or None, open_health=_flag(env, "OPEN_HEALTH"),
            open_metrics=_flag(env, "OPEN_METRICS"), insecure_public=_flag(env, "INSECURE_PUBLIC"),
        )

    def is_open(self, route: str) -> bool:
        return self.token is None or (self.open_health if route == "health" else self.open_metrics)

    def allows(self, authorization: str | None) -> bool:
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest((authorization or "").encode(), expected)

    def check_bind(self, host: str) -> None:
        """Refuse to expose open /health and /metrics beyond this machine unless the operator says so."""
        from sync.cli import is_loopback

        if self.token is None and not self.insecure_public and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen on {host} with /health and /metrics open to anyone who can reach it; "
                f"set ${ENV_PREFIX}TOKEN (then they need 'Authorization: Bearer <token>'), "
                f"or set {ENV_PREFIX}INSECURE_PUBLIC=1"
            )


class DaemonHandler(BoundedHandler):
    """``POST /webhooks/hub``, ``GET /health``, ``GET /metrics``; any other method or route is a 4xx."""

    server_version = "hubserve-daemon"
    server: DaemonServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: webhook outcomes are logged by the daemon, without headers (no secret in logs)."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/health", "/metrics"):
            status = 405 if path == "/webhooks/hub" else 404
            return self._json(status, {"error": f"no route GET {printable(path, limit=200)}"}, allow="POST")
        route = path[1:]
        access = self.server.access
        if not access.is_open(route) and not access.allows(self.headers.get("Authorization")):
            return self._json(401, {"error": f"{path} needs 'Authorization: Bearer <token>' (${ENV_PREFIX}TOKEN)"},
                              extra={"WWW-Authenticate": 'Bearer realm="hubserve-daemon"'})
        if route == "health":
            self._send(200, json.dumps(self.server.view.health()).encode(), "application/json")
        else:
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/webhooks/hub":
            status = 405 if path in ("/health", "/metrics") else 404
            return self._json(status, {"error": f"no route POST {printable(path, limit=200)}"}, allow="GET")
        refused = check_secret(self.headers.get(SECRET_HEADER), self.server.view.webhook_secret())
        if refused is not None:  # before the body is read: an unread body is drained or the connection ends
            log.warning("webhook refused: %s secret", "missing" if refused == 401 else "wrong")
            return self._json(refused, {"error": f"{'missing' if refused == 401 else 'wrong'} {SECRET_HEADER}"})
        try:
            event = parse_event(self.read_body(MAX_BODY))
        except BodyRefused as e:
            return self._json(e.status, {"error": e.message})
        except PayloadError as e:
            return self._json(400, {"error": str(e)})
        self._json(202, self.server.view.on_webhook(event))

    def _not_allowed(self) -> None:
        self._json(405, {"error": f"method {printable(self.command, limit=40)} not allowed"}, allow="GET, POST")

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _json(
        self, status: int, data: dict[str, Any], allow: str | None = None, extra: dict[str, str] | None = None
    ) -> None:
        headers = {**(extra or {}), **({"Allow": allow} if status == 405 and allow else {})}
        self._send(status, json.dumps(data).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class DaemonServer(BoundedServer):
    """The listener: connections capped and deadlines kept (``limits``), reads gated by ``access``."""

    def __init__(
        self, address: tuple[str, int], view: DaemonView, metrics: DaemonMetrics, *,
        access: DaemonAccess | None = None, limits: Limits | None = None,
    ) -> None:
        self.view, self.metrics = view, metrics
        self.access = access or DaemonAccess.from_env()
        self.access.check_bind(address[0])
        super().__init__(address, DaemonHandler, limits or Limits.from_env(ENV_PREFIX, max_connections=64))

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("listener: connection from %s ended with an error", client_address, exc_info=True)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8091`` for IPv6) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8091")
    return host.strip("[]"), int(port)

