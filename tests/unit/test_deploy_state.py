"""docker/: where the gateway keeps its state. Compose: an embedded SQLite file on a writable volume (the config
mount is read-only), or the `replicas` profile's Redis; Kubernetes: the replicas share one persistent Redis (AOF on
a volume, nothing evicted, a password from the secret, never in a manifest). The Redis options in these files are
started on a real redis-server, so a typo in them fails here, not in a cluster."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.redis_server import REDIS_SERVER, RedisServer, require_redis

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"


def _docs(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _starts(options: list[str], tmp_path: Path) -> None:
    """redis-server takes these options (with a port, a folder and a password of the test's own) and answers."""
    require_redis()
    server = RedisServer(tmp_path)
    process = subprocess.Popen([REDIS_SERVER, *options, "--port", str(server.port), "--bind", "127.0.0.1",
                                "--dir", str(tmp_path), "--requirepass", server.password],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server.process = process
    try:
        deadline = time.monotonic() + 10
        while not server._answers():
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise AssertionError(f"redis-server refused {options}: {process.stdout.read().decode()[-500:]}")  # type: ignore[union-attr]
            time.sleep(0.02)
    finally:
        server.stop()


def test_compose_keeps_the_state_on_a_writable_volume_or_in_the_replicas_redis(tmp_path: Path) -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("server", "server-gpu"):
        assert services[name]["environment"]["HUBSERVE_STATE_URL"] == "${HUBSERVE_STATE_URL:-sqlite:///state/state.db}"
        assert "state:/state" in services[name]["volumes"] and "./config:/config:ro" in services[name]["volumes"]
    redis = services["redis"]
    assert redis["profiles"] == ["replicas"] and redis["image"].startswith("redis:7")
    assert "ports" not in redis  # reachable on the compose network only
    assert "redis:/data" in redis["volumes"] and {"state", "redis"} <= set(compose["volumes"])
    command = redis["command"]
    assert command[0] == "redis-server" and command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    _starts(command[1:], tmp_path)
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):  # the unprivileged user owns the state folder
        assert "chown hubserve /store /config /state" in (DOCKER / dockerfile).read_text()


def test_k8s_replicas_share_one_persistent_redis(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "redis.yaml" in kustomization["resources"]
    res = _docs(K8S / "redis.yaml")
    redis = res[("Deployment", "hubserve-redis")]
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"]["type"] == "Recreate"
    pod = redis["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"].startswith("redis:7")
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--dir") + 1] == "/data"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert _env(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "hubserve",
                                                                                "key": "redis-password"}
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "hubserve-redis"
    assert ("PersistentVolumeClaim", "hubserve-redis") in res
    assert res[("Service", "hubserve-redis")]["spec"]["ports"][0]["port"] == 6379
    # the same options on a real redis-server (the secret's password stands in for $(REDIS_PASSWORD))
    options = args[: args.index("--dir")] + args[args.index("--dir") + 2 : args.index("--requirepass")]
    _starts(options, tmp_path)

    server = _docs(K8S / "server.yaml")[("Deployment", "hubserve")]
    env = _env(server["spec"]["template"]["spec"]["containers"][0])
    assert server["spec"]["replicas"] > 1
    assert env["HUBSERVE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert env["HUBSERVE_STATE_URL"]["value"] == "redis://:$(HUBSERVE_REDIS_PASSWORD)@hubserve-redis:6379/0"
    names = list(env)  # Kubernetes expands $(VAR) only from variables listed before it
    assert names.index("HUBSERVE_REDIS_PASSWORD") < names.index("HUBSERVE_STATE_URL")


def test_k8s_tiered_replicas_take_the_state_url_from_the_secret() -> None:
    edge = _docs(K8S / "tiered" / "edge.yaml")[("StatefulSet", "hubserve-edge")]
    server = next(c for c in edge["spec"]["template"]["spec"]["containers"] if c["name"] == "server")
    assert _env(server)["HUBSERVE_STATE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "hubserve", "key": "state-url"}


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_no_manifest_holds_a_redis_password() -> None:
    for path in [DOCKER / "compose.yaml", *K8S.rglob("*.yaml")]:
        for value in (s for doc in yaml.safe_load_all(path.read_text()) for s in _strings(doc)):
            assert "redis://:" not in value.replace("redis://:$(", ""), path  # a password only from a secret
            assert "requirepass" not in value or value == "--requirepass", path
