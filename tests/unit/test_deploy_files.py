"""docker/: Dockerfiles pass hadolint and install through scripts/setup.sh; compose and Kubernetes files
are valid and wired as documented (probes, read-only store for servers, one writer, GPUs, metrics)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sync.manifest import parse_manifest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
K8S_VERSION = "1.30.0"  # the oldest release the manifests are meant for (native sidecars: 1.29+)


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} missing: run scripts/setup.sh (test extra)"
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    done = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("dockerfile", "extras"), [("Dockerfile", "gpu"), ("Dockerfile.cpu", "cpu")])
def test_images_install_through_setup_sh(dockerfile: str, extras: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    runs = [line for line in text.splitlines() if "scripts/setup.sh" in line and line.startswith("RUN")]
    assert len(runs) == 1 and f"HUBSERVE_EXTRAS={extras} " in runs[0]
    assert not re.search(r"pip install[^\n]*\s\.(\[|\s|$)", text), "hubserve installed outside setup.sh"


def _render(folder: Path) -> list[dict[str, Any]]:
    """The Kustomize output (kubectl kustomize when present), else the listed resource files as they are."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [d for f in kustomization["resources"] for d in yaml.safe_load_all((folder / f).read_text()) if d]


def _by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = workload["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


@pytest.mark.parametrize("folder", [K8S, K8S / "tiered"], ids=["shared", "tiered"])
def test_k8s_manifests_validate_strictly(folder: Path) -> None:
    docs = _render(folder)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: kubernetes-validate has no schema for it
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for manifest in folder.glob("models.toml"):
        parse_manifest(manifest.read_text(), str(manifest))


def test_k8s_shared_store_layout() -> None:
    res = _by_kind(_render(K8S))
    server = res[("Deployment", "hubserve")]
    c = _container(server, "server")
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert all(m["readOnly"] for m in c["volumeMounts"] if m["name"] == "data")
    daemon = res[("Deployment", "hubserve-daemon")]
    assert daemon["spec"]["replicas"] == 1 and daemon["spec"]["strategy"]["type"] == "Recreate"
    assert _container(daemon, "daemon")["args"][:1] == ["daemon"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in server["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {"hubserve-store"} and ("PersistentVolumeClaim", "hubserve-store") in res
    monitor = res[("ServiceMonitor", "hubserve")]
    assert monitor["spec"]["endpoints"][0] == {  # /metrics is closed once keys exist: the scraper sends one
        "port": "http", "path": "/metrics", "interval": "15s",
        "authorization": {"type": "Bearer", "credentials": {"name": "hubserve", "key": "metrics-key"}},
    }
    service = res[("Service", "hubserve")]
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] in monitor["spec"]["selector"][
        "matchExpressions"][0]["values"]  # fmt: skip
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


def test_k8s_tiered_replicas_sync_their_own_store_from_the_mirror() -> None:
    edge = _by_kind(_render(K8S / "tiered"))[("StatefulSet", "hubserve-edge")]
    assert edge["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert _container(edge, "daemon")["restartPolicy"] == "Always"  # a sidecar, one per replica
    manifest = parse_manifest((K8S / "tiered" / "models.toml").read_text())
    assert manifest.upstream.endpoint.startswith("http://hubserve-mirror:")


def test_compose_runs_daemon_server_and_mirror_on_one_store() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    # loopback: the daemon refuses a public bind without HUBSERVE_DAEMON_TOKEN; its healthcheck runs inside
    assert services["daemon"]["command"] == ["daemon", "--config", "/config/models.toml", "--listen", "127.0.0.1:8091"]
    for name in ("daemon", "server", "server-gpu", "mirror"):
        volumes = services[name]["volumes"]
        assert any(v.startswith("store:/store") for v in volumes), name
        if name != "daemon":  # one writer
            assert "store:/store:ro" in volumes, name
    for name in ("server", "server-gpu"):
        assert services[name]["healthcheck"]["test"][-1].endswith(":8080/ready")
    assert services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
