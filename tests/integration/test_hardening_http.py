"""Issue 16 against real servers on loopback, with raw sockets: header injection, desync, connection bounds,
deadlines, malformed requests (a seeded fuzz), X-Forwarded-Host trust, the daemon's access rules."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sync.errors import UnsafePathError
from sync.httpbounds import Limits
from sync.importer import import_folder
from sync.mirror import MirrorServer, make_mirror
from sync.store import Store
from sync.upstream import Upstream as HubUpstream
from tests.conftest import hubserve
from tests.integration.test_sync import write_manifest

pytestmark = pytest.mark.integration

REPO = "acme/small"
TOKEN = "mirror-t0ken"
EVIL = "evil\r\nX-Injected: yes\r\n.txt"


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    base = tmp_path_factory.mktemp("hardening")
    folder = base / "small"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}\n')
    (folder / "weights.safetensors").write_bytes(os.urandom(5000))
    st = Store(base / "store")
    st.ensure()
    import_folder(st, folder, REPO)
    return st


@pytest.fixture
def mirror(store: Store) -> Iterator[MirrorServer]:
    server = make_mirror(store, "127.0.0.1", 0, page_size=1,
                         limits=Limits(max_connections=8, idle_timeout=2, header_timeout=0.6, body_timeout=0.6))
    _serve(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def guarded(store: Store) -> Iterator[MirrorServer]:
    server = make_mirror(store, "127.0.0.1", 0, token=TOKEN)
    _serve(server)
    yield server
    server.shutdown()
    server.server_close()


def exchange(port: int, data: bytes, quiet: float = 0.5) -> bytes:
    """Send raw bytes, then read until the server closes or stays quiet for ``quiet`` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.settimeout(quiet)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def statuses(raw: bytes) -> list[int]:
    """Every status line in what came back (a second response starts right after the first body)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


def head_of(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")


# ---- 1. control characters ------------------------------------------------------------------------
class _CraftedHub(BaseHTTPRequestHandler):
    """An upstream that lists a file whose name carries CR/LF (what a hostile or broken Hub could send)."""

    def log_message(self, format: str, *args: object) -> None: ...

    def do_GET(self) -> None:
        if "/revision/" in self.path:
            body = {"sha": "1" * 40}
        else:
            body = [{"type": "file", "path": EVIL, "size": 3, "oid": "2" * 40}]
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_crlf_name_from_an_upstream_is_refused_with_one_line(tmp_path: Path) -> None:
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _CraftedHub)
    _serve(hub)
    url = f"http://127.0.0.1:{hub.server_address[1]}"
    try:
        with pytest.raises(UnsafePathError, match="control characters"):
            HubUpstream(url, None, retries=0).list_files(REPO, "1" * 40)
        cfg = write_manifest(tmp_path, url, [{"name": "small", "repo": REPO, "revision": "main"}])
        result = hubserve("sync", "--config", str(cfg))
    finally:
        hub.shutdown()
        hub.server_close()
    assert result.returncode != 0
    assert "control characters" in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "store").glob("models--*/snapshots/*/*"))  # nothing stored


def test_control_characters_in_request_paths_are_400_without_injected_headers(mirror: MirrorServer) -> None:
    port = mirror.server_address[1]
    for target in (f"/{REPO}/resolve/main/evil%0d%0aX-Injected:%20yes", f"/api/models/{REPO}/revision/ma%0ain",
                   f"/api/models/{REPO}/tree/main/a%1b[2J", f"/{REPO}/resolve/main%0d%0aX-Injected:%20yes/config.json"):
        raw = exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert statuses(raw)[:1] == [400], raw
        assert "X-Injected" not in head_of(raw).replace("X-Injected:%20", "")  # only escaped, inside a value
        assert all(line.count(":") >= 1 for line in head_of(raw).split("\r\n")[1:])


def test_a_stored_crlf_name_is_not_served(store: Store, mirror: MirrorServer) -> None:
    """A record written before names were checked (edited here by hand) is ignored, never sent as headers."""
    record = store.revisions(REPO)[0]
    path = store.record_path(REPO, record.commit)
    original = path.read_text()
    doc = json.loads(original)
    doc["files"][0]["path"] = EVIL
    path.write_text(json.dumps(doc))
    try:
        raw = exchange(mirror.server_address[1],
                       f"GET /{REPO}/resolve/{record.commit}/evil%0d%0a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw2 = exchange(mirror.server_address[1],
                        f"GET /api/models/{REPO}/revision/{record.commit} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    finally:
        path.write_text(original)
    assert statuses(raw) == [400] and statuses(raw2) == [404]
    assert "\r\nX-Injected" not in raw.decode("latin-1") + raw2.decode("latin-1")


# ---- 2. desync ------------------------------------------------------------------------------------
SMUGGLED = b"GET /api/models HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("target", [f"/api/models/{REPO}/paths-info/main", "/no/such/route", f"/{REPO}/resolve/main/x"])
def test_an_unread_post_body_is_never_parsed_as_a_request(guarded: MirrorServer, target: str) -> None:
    port = guarded.server_address[1]
    post = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n".encode() + SMUGGLED
    assert len(statuses(exchange(port, post))) == 1  # 401 or 405: only one response, never the smuggled one
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    chunked = f"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunk
    assert len(statuses(exchange(port, chunked))) == 1
    get = f"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n".encode() + SMUGGLED
    assert statuses(exchange(port, get)) == [200]


def test_post_only_on_paths_info(guarded: MirrorServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", guarded.server_address[1], timeout=5)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-www-form-urlencoded"}
    conn.request("POST", f"/{REPO}/resolve/main/paths-info/config.json", body=b"", headers=auth)
    assert conn.getresponse().status == 405
    conn = http.client.HTTPConnection("127.0.0.1", guarded.server_address[1], timeout=5)
    conn.request("POST", f"/api/models/{REPO}/paths-info/main", body=b"paths=config.json", headers=auth)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())[0]["path"] == "config.json"
    conn.request("GET", "/health")  # same connection: the body was read, keep-alive goes on
    assert conn.getresponse().status == 200


# ---- 3. X-Forwarded-Host ----------------------------------------------------------------------------
def test_forwarded_host_is_used_only_when_trusted(store: Store) -> None:
    import_folder(store, Path(__file__).parent, "acme/second", refs=("main",))  # two models: a next page
    for trust, expect in ((False, "http://mirror.local:1234/"), (True, "https://proxy.example/")):
        server = make_mirror(store, "127.0.0.1", 0, page_size=1, trust_forwarded=trust)
        _serve(server)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
            forwarded = {"X-Forwarded-Host": "proxy.example", "X-Forwarded-Proto": "https"}
            conn.request("GET", "/api/models", headers={"Host": "mirror.local:1234", **forwarded})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Link", "").startswith(f"<{expect}api/models?"), resp.headers
            resp.read()
            conn.request("GET", "/api/models", headers={"Host": "bad host", "X-Forwarded-Host": "a b"})
            link = conn.getresponse().getheader("Link", "")
            assert link.startswith(f"<http://127.0.0.1:{server.server_address[1]}/"), link
        finally:
            server.shutdown()
            server.server_close()


# ---- 4. connection bounds and deadlines -----------------------------------------------------------
def test_half_sent_requests_are_capped_and_dropped_at_the_header_deadline(mirror: MirrorServer) -> None:
    port = mirror.server_address[1]
    before = threading.active_count()
    socks = []
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    time.sleep(0.2)
    peak = threading.active_count() - before
    assert peak <= 8, f"{peak} handler threads for 60 half-sent requests (cap 8)"
    refused = 0
    for s in socks[8:]:
        s.settimeout(2)
        try:
            refused += b" 503 " in s.recv(4096)
        except OSError:
            refused += 1
    assert refused == 52
    time.sleep(0.7)  # the header deadline (0.6 s) ends the 8 that held a slot
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    for s in socks:
        s.close()


def test_a_slow_drip_does_not_outlive_the_header_deadline(mirror: MirrorServer) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", mirror.server_address[1]), timeout=5) as s:
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":  # one byte every 0.1 s: fine per recv
                s.send(bytes([byte]))
                time.sleep(0.1)
            closed = False
        except OSError:
            closed = True
        if not closed:
            s.settimeout(2)
            closed = s.recv(100) == b""
    assert closed and time.monotonic() - started < 4


# ---- 5. malformed input: always a 4xx ---------------------------------------------------------------
DEEP = b'{"paths":' + b"[" * 10000 + b"]" * 10000 + b"}"
BAD = [
    b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x01\x02garbage\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 120 + b"\r\n",
    b"GET /health HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST /api/models/a/b/paths-info/main HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"POST /api/models/a/b/paths-info/main HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /health HTTP/1.1\r\nContent-Length: " + b"9" * 4300 + b"\r\n\r\n",
    b"GET /api/models?cursor=" + b"9" * 5000 + b" HTTP/1.1\r\n\r\n",
    f"GET /{REPO}/resolve/main/config.json HTTP/1.1\r\nRange: bytes={'9' * 4300}-\r\n\r\n".encode(),
    f"GET /{REPO}/resolve/main/config.json HTTP/1.1\r\nRange: bytes=--1\r\n\r\n".encode(),
    b"POST /api/models/acme/small/paths-info/main HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(DEEP)).encode() + b"\r\n\r\n" + DEEP,
]


def _mutants(seed: int, n: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    base = [f"GET /{REPO}/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\n\r\n".encode(),
            f"POST /api/models/{REPO}/paths-info/main HTTP/1.1\r\nContent-Length: 17\r\n\r\npaths=config.json".encode(),
            f"GET /api/models/{REPO}/tree/main?recursive=1&cursor=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()]
    for _ in range(n):
        data = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[i] = rng.randrange(256)
            elif op < 0.7:
                del data[i:i + rng.randint(1, 8)]
            else:
                data[i:i] = rng.choice([b"\r\n", b"\x00", b"%0d%0a", b" ", b":", b"9" * 30, b"\xff"])
        yield bytes(data)


def test_malformed_requests_are_4xx_never_5xx(mirror: MirrorServer, caplog: pytest.LogCaptureFixture) -> None:
    port = mirror.server_address[1]
    cases = [*BAD, *_mutants(16, 300)]
    for data in cases:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except ConnectionResetError:
                pass
        assert all(code < 500 for code in statuses(out)), (data[:200], out[:300])
    assert statuses(exchange(port, BAD[12])) == [416] and statuses(exchange(port, BAD[-1])) == [400]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
    print(f"mirror: {len(cases)} malformed requests, 0 5xx, 0 tracebacks")


# ---- 6. the daemon's listener ------------------------------------------------------------------------
class Daemon:
    def __init__(self, tmp_path: Path, env: dict[str, str], listen: str = "127.0.0.1:0") -> None:
        cfg = write_manifest(tmp_path, "http://127.0.0.1:9", [])
        cfg.write_text(cfg.read_text() + '\n[daemon]\nwebhook_secret_env = "HARDEN_SECRET"\n')
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "daemon", "--config", str(cfg), "--listen", listen],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HARDEN_SECRET": "s3cret", **env},
        )
        self.port = 0
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "listening on http://127.0.0.1:" in line:
                self.port = int(line.rsplit(":", 1)[1])
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stdout or ()], daemon=True).start()

    def get(self, path: str, headers: dict[str, str] | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", path, headers=headers or {})
        return conn.getresponse().status

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_daemon_listener_bounds_desync_deep_json_and_access(tmp_path: Path) -> None:
    d = Daemon(tmp_path, {"HUBSERVE_DAEMON_TOKEN": "rd-t0ken", "HUBSERVE_DAEMON_OPEN_HEALTH": "1",
                          "HUBSERVE_DAEMON_MAX_CONNECTIONS": "6", "HUBSERVE_DAEMON_HEADER_TIMEOUT": "0.8"})
    try:
        assert d.port, "the daemon did not start"
        assert d.get("/health") == 200  # opened by setting
        assert d.get("/metrics") == 401 and d.get("/metrics", {"Authorization": "Bearer rd-t0ken"}) == 200
        # desync: a refused POST (404 route, 401 secret) with a whole request as its body gets one response
        for target, extra in (("/nope", ""), ("/webhooks/hub", "")):
            post = f"POST {target} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {len(SMUGGLED)}\r\n\r\n".encode()
            assert len(statuses(exchange(d.port, post + SMUGGLED))) == 1
        deep = b"[" * 50_000 + b"]" * 50_000
        hook = (f"POST /webhooks/hub HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: s3cret\r\n"
                f"Content-Length: {len(deep)}\r\n\r\n").encode() + deep
        assert statuses(exchange(d.port, hook)) == [400]
        for data in BAD[:8]:
            assert all(400 <= c < 500 for c in statuses(exchange(d.port, data, quiet=0.3))), data[:100]
        base = d.threads()
        socks = [socket.create_connection(("127.0.0.1", d.port), timeout=5) for _ in range(40)]
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow:")
        time.sleep(0.3)
        assert d.threads() - base <= 6
        time.sleep(0.8)
        assert d.get("/health") == 200
        for s in socks:
            s.close()
    finally:
        d.stop()


def test_daemon_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    cfg = write_manifest(tmp_path, "http://127.0.0.1:9", [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_DAEMON_")}
    argv = [sys.executable, "-m", "server.cli", "daemon", "--config", str(cfg), "--listen", "0.0.0.0:0"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0" in result.stderr
    assert "HUBSERVE_DAEMON_TOKEN" in result.stderr and "Traceback" not in result.stderr
