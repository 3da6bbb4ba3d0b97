"""Raw-socket fuzzing of the mirror's and the daemon's HTTP servers, each a real ``hubserve`` process.

Cases: malformed request lines, header edits (huge numbers, control characters, folding, duplicates),
chunked bodies, pipelined requests (one smuggling a request in a body the server may not read), and
nested or odd JSON to the webhook. Oracles, per case: no 5xx (501 for an unknown method and 505 for an
unsupported version are what RFC 9110 prescribes, counted apart), no more responses than requests (a
body parsed as a request is a desync), a complete request is answered, no traceback in the server's
output, and the server still answers a good request afterwards.

    python -m tests.fuzz.http --cases 2000 --seed 1
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.common import Findings, main

REPO = "hubserve-test/tiny-llama"
SECRET_ENV, SECRET = "HUBSERVE_FUZZ_WEBHOOK_SECRET", "fuzz-secret"
STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")  # anywhere: a body without CRLF may precede one
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
HUGE = "9" * 5000  # past int()'s 4300-digit limit
PROTOCOL_5XX = {"501", "505"}
MIRROR_TOKEN = "fuzz-mirror-token"


@dataclass
class Case:
    kind: str
    data: bytes
    requests: int  # how many requests a correct server may answer at most
    complete: bool  # a well-formed request: the server must answer it


class Target:
    """A ``hubserve mirror`` or ``hubserve daemon`` subprocess, its output collected as it arrives."""

    def __init__(self, name: str, argv: list[str], paths: list[str], health: str, env: dict[str, str],
                 token: str | None = None) -> None:
        self.name, self.argv, self.paths, self.health, self.env, self.token = name, argv, paths, health, env, token
        self.lines: list[str] = []
        self.port = 0
        self.start()

    def start(self) -> None:
        argv = [a.replace("{port}", str(_free_port())) for a in self.argv]
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, **self.env})
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(r"(?:on|listening on) http://127\.0\.0\.1:(\d+)", line):
                    self.port = int(m.group(1))
            if self.port and self.alive():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.lines))

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def alive(self) -> bool:
        auth = f"Authorization: Bearer {self.token}\r\n" if self.token else ""
        good = f"GET {self.health} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode()
        try:
            reply = exchange(self.port, good, timeout=5)
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.1 200") or reply.startswith(b"HTTP/1.0 200")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, read everything until the server closes (or ``timeout``)."""
    out = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early (a refused request line): read what it said
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


# ---- cases --------------------------------------------------------------------------------------
def request(method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
            version: str = "HTTP/1.1") -> bytes:
    hs = headers if headers is not None else [("Host", "127.0.0.1")]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hs):
        hs = [*hs, ("Content-Length", str(len(body)))]
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def case_request_line(rng: random.Random, t: Target) -> Case:
    path = rng.choice(t.paths)
    choice = rng.randrange(8)
    if choice == 0:
        return Case("request-line:garbage", rng.randbytes(rng.randint(1, 200)) + b"\r\n\r\n", 1, False)
    if choice == 1:
        method = rng.choice(["BREW", "get", "G\x00T", "X" * 10_000, "CONNECT", "TRACE", "PATCH", "OPTIONS"])
        return Case("request-line:method", request(method, path), 1, False)
    if choice == 2:
        bad = rng.choice(["\x00", "\r", "\x1b[2J", "%00", "%ZZ", "/../../etc/passwd", "\x7f", "\xff", " ", "#frag",
                          "?" + "a=" * 5000, "/" * 3000, "%2e%2e/%2e%2e", "\t"])
        i = rng.randrange(len(path) + 1)
        return Case("request-line:uri", request("GET", path[:i] + bad + path[i:]), 1, False)
    if choice == 3:
        return Case("request-line:long-uri", request("GET", path + "a" * rng.choice([8000, 70_000, 300_000])), 1, False)
    if choice == 4:
        version = rng.choice(["HTTP/9.9", "HTTP/1", "HTTP/1.1.1", "", "HTTP/01.1", "HTTP/1." + "0" * 50, "http/1.1",
                              "HTTP/2.0", "HTTP/0.9", "HTTP/1.1 extra"])
        return Case("request-line:version", request("GET", path, version=version), 1, False)
    if choice == 5:
        return Case("request-line:absolute", request("GET", "http://evil.example" + path), 1, False)
    if choice == 6:
        return Case("request-line:empty-lines", b"\r\n" * rng.randint(1, 50) + request("GET", path), 2, False)
    return Case("request-line:bare-lf", request("GET", path).replace(b"\r\n", b"\n"), 1, False)


def case_headers(rng: random.Random, t: Target) -> Case:
    path = rng.choice(t.paths)
    hs = [("Host", "127.0.0.1")]
    choice = rng.randrange(10)
    kind = "headers"
    if choice == 0:
        hs.append(("Range", rng.choice([
            f"bytes={HUGE}-", f"bytes=0-{HUGE}", "bytes=5-1", "bytes=-0", "bytes=0-0,1-1,2-2",
            "bytes=" + ",".join(["0-1"] * 2000), "bytes=-" + HUGE, "items=0-1", "bytes=x-",
        ])))
        kind = "headers:range"
    elif choice == 1:
        hs.append(("Content-Length", rng.choice(["-1", "+5", "1e3", "0x10", " 5 ", HUGE, "5, 6", "", "٣"])))
        kind = "headers:content-length"
    elif choice == 2:
        hs += [("Content-Length", "5"), ("Content-Length", "500")]
        kind = "headers:duplicate-length"
    elif choice == 3:
        hs.append(("X-Folded", "a\r\n continued"))
        kind = "headers:folding"
    elif choice == 4:
        hs.append((rng.choice(["Bad Name", "X:Y", "", "\x00", "X\x7f"]), "v"))
        kind = "headers:name"
    elif choice == 5:
        hs.append(("X-Big", "v" * rng.choice([10_000, 70_000, 200_000])))
        kind = "headers:huge-value"
    elif choice == 6:
        hs += [(f"X-H{i}", "v") for i in range(rng.choice([120, 500, 2000]))]
        kind = "headers:many"
    elif choice == 7:
        hs.append((rng.choice(["Authorization", "X-Webhook-Secret", "If-Range", "Accept-Encoding", "Cookie"]),
                   rng.choice(["\x00", "a\x1bb", "\x7f", "Bearer " + "x" * 9000, "\udcff\udcfe", "é", HUGE])))
        kind = "headers:control-chars"
    elif choice == 8:
        hs = []  # no Host
        kind = "headers:no-host"
    else:
        hs += [("Expect", "100-continue"), ("Content-Length", "10")]
        return Case("headers:expect", request("POST", path, hs) + b"0123456789", 1, True)
    method = rng.choice(["GET", "GET", "HEAD"]) if "resolve" in path else "GET"
    return Case(kind, request(method, path, hs), 1, choice in (0, 7))


def case_chunked(rng: random.Random, t: Target) -> Case:
    path = rng.choice([p for p in t.paths if "webhook" in p] or t.paths)
    body = rng.choice([
        b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffffffffffff\r\nx\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n", b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n", b"5\r\nhello",
        b"0\r\n\r\n", HUGE.encode() + b"\r\nx\r\n0\r\n\r\n",
    ])
    te = rng.choice(["chunked", "chunked, identity", "Chunked", " chunked"])
    hs = [("Host", "127.0.0.1"), ("Transfer-Encoding", te), ("X-Webhook-Secret", SECRET),
          ("Content-Type", "application/json")]
    if rng.random() < 0.4:
        hs.append(("Content-Length", str(rng.randint(0, len(body)))))
    return Case("chunked", request("POST", path, hs, body), 2, False)


def case_pipeline(rng: random.Random, t: Target) -> Case:
    """Real requests back to back; a body the server may skip carries a request that must never run."""
    parts, n = [], rng.randint(2, 4)
    for _ in range(n):
        choice = rng.randrange(4)
        if choice == 0:
            parts.append(request("GET", rng.choice(t.paths)))
        elif choice == 1:  # a POST refused before its body is read (404, 401, 405...)
            path = rng.choice(["/nope", "/api/models/x/y", t.paths[0], "/webhooks/hub"])
            parts.append(request("POST", path, [("Host", "x"), ("Content-Length", str(len(SMUGGLED)))], SMUGGLED))
        elif choice == 2:
            parts.append(request("HEAD" if rng.random() < 0.3 else "GET", rng.choice(t.paths)))
        else:
            parts.append(request("POST", "/webhooks/hub", [("Host", "x"), ("X-Webhook-Secret", "wrong"),
                                                            ("Content-Length", str(len(SMUGGLED)))], SMUGGLED))
    data = b"".join(parts)
    heads = data.count(b"HEAD ")
    return Case("pipeline" + (":head" if heads else ""), data, n, True)


def case_json(rng: random.Random, t: Target) -> Case:
    depth = rng.choice([10, 1000, 100_000])
    choice = rng.randrange(8)
    if choice == 0:
        body = b"[" * depth + b"]" * depth
    elif choice == 1:
        body = b'{"a":' * depth + b"1" + b"}" * depth
    elif choice == 2:
        body = json.dumps({"event": {"scope": "repo.content"}, "repo": {"name": REPO, "headSha": "a" * 40}}).encode()
        body = body.replace(b'"repo.content"', rng.choice([b"1" + b"0" * 5000, b"1e999999", b"-0", b"NaN", b"null"]))
    elif choice == 3:
        body = b'{"event": {"scope": "repo.content"}, "repo": {"name": "' + REPO.encode() + b'"}, "updatedRefs": ' + \
            rng.choice([b'"x"', b"[1, null, {}]", b"{}", b"[" + b'{"ref": ' + HUGE.encode() + b"}]", b"true"]) + b"}"
    elif choice == 4:
        body = rng.randbytes(rng.randint(1, 300))
    elif choice == 5:
        body = json.dumps({"event": None, "repo": {"name": ["x"]}}).encode()
    elif choice == 6:
        body = b'{"event": {"scope": "repo.content"}, "repo": {"name": "' + REPO.encode() + b'", "type": "model"' \
            b', "headSha": "' + rng.choice([b"\\u0000", b"\xff\xfe", b"a" * 100_000]) + b'"}}'
    else:
        body = json.dumps({"event": {"scope": "repo.content"}, "repo": {"name": REPO, "headSha": "a" * 40},
                           "updatedRefs": [{"ref": "refs/heads/main"}]}).encode()
    hs = [("Host", "127.0.0.1"), ("X-Webhook-Secret", SECRET), ("Content-Type", "application/json")]
    path = "/webhooks/hub" if t.name == "daemon" else rng.choice(t.paths)
    return Case(f"json:{choice}", request("POST", path, hs, body), 1, len(body) <= 1 << 20)


GENERATORS = [case_request_line, case_headers, case_chunked, case_pipeline, case_json]


# ---- the run ------------------------------------------------------------------------------------
def check(t: Target, case: Case, findings: Findings, rng: random.Random) -> None:
    seen = len(t.lines)
    if t.token and rng.random() < 0.7 and b"\r\n" in case.data:  # the first request authenticated, most times
        line, rest = case.data.split(b"\r\n", 1)
        case = Case(case.kind, line + f"\r\nAuthorization: Bearer {t.token}\r\n".encode() + rest, case.requests,
                    case.complete)
    try:
        reply = exchange(t.port, case.data)
    except OSError as e:
        reply = b""
        findings.statuses[f"connect {type(e).__name__}"] += 1
    statuses = [m.decode() for m in STATUS_RE.findall(reply)]
    for s in statuses:
        findings.statuses[s] += 1
    statuses = [s for s in statuses if not s.startswith("1")]  # 100 Continue is an interim answer
    bad = [s for s in statuses if s.startswith("5") and s not in PROTOCOL_5XX]
    if bad:
        findings.fail("5xx", case.kind, f"{t.name} answered {', '.join(bad)}", case.data)
    if len(statuses) > case.requests and not case.kind.endswith(":head"):
        findings.fail("desync", case.kind, f"{t.name}: {len(statuses)} responses to {case.requests} request(s)",
                      case.data)
    if case.complete and not statuses:
        findings.fail("dropped", case.kind, f"{t.name} closed a complete request without an answer", case.data)
    if not t.alive():
        findings.fail("dead", case.kind, f"{t.name} no longer answers GET {t.health}", case.data)
        t.stop()
        t.start()
    time.sleep(0.005)
    if any("Traceback" in line for line in t.lines[seen:]):
        findings.fail("traceback", case.kind, f"{t.name} printed a traceback", case.data)


def targets(tmp: Path) -> list[Target]:
    from sync.importer import import_folder
    from sync.store import Store
    from tests.fixtures.tiny import tiny_llama_dir

    store = Store(tmp / "store")
    commit = import_folder(store, tiny_llama_dir(), REPO).record.commit
    mirror_paths = [f"/api/models/{REPO}", f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}/revision/{commit}",
                    f"/api/models/{REPO}/tree/main?recursive=true&expand=false", f"/{REPO}/resolve/main/config.json",
                    f"/{REPO}/resolve/{commit}/model.safetensors", "/api/agent-harnesses",
                    f"/api/models/{REPO}/revision/refs%2Fpr%2F1"]
    mirror = Target("mirror", ["mirror", "--store", str(store.root), "--host", "127.0.0.1", "--port", "{port}"],
                    mirror_paths, f"/api/models/{REPO}", {"HUBSERVE_MIRROR_TOKEN": MIRROR_TOKEN}, MIRROR_TOKEN)
    cfg = tmp / "models.toml"
    cfg.write_text(f'[store]\npath = "daemon-store"\n[upstream]\nendpoint = "http://127.0.0.1:{mirror.port}"\n'
                   f'token_env = "HUBSERVE_FUZZ_MIRROR_TOKEN"\nretries = 0\n'
                   f'[daemon]\nwebhook_secret_env = "{SECRET_ENV}"\nverify_interval = "off"\n'
                   f'[[models]]\nname = "tiny"\nrepo = "{REPO}"\nrevision = "main"\nfollow = true\n')
    daemon = Target("daemon", ["daemon", "--config", str(cfg), "--listen", "127.0.0.1:0", "--interval", "3600"],
                    ["/health", "/metrics", "/webhooks/hub"], "/health",
                    {SECRET_ENV: SECRET, "HUBSERVE_FUZZ_MIRROR_TOKEN": MIRROR_TOKEN})
    return [mirror, daemon]


def run(cases: int, rng: random.Random, only: str | None = None) -> list[Findings]:
    out = []
    with tempfile.TemporaryDirectory(prefix="hubserve-fuzz-http-") as tmp:
        ts = targets(Path(tmp))
        try:
            for t in ts:
                if only and t.name != only:
                    continue
                findings, started = Findings(f"http {t.name}", 0), time.monotonic()
                for _ in range(cases):
                    case = rng.choice(GENERATORS)(rng, t)
                    findings.cases += 1
                    findings.kinds[case.kind.split(":")[0]] += 1
                    check(t, case, findings, rng)
                findings.seconds = time.monotonic() - started
                out.append(findings)
        finally:
            for t in ts:
                t.stop()
    return out


if __name__ == "__main__":
    main("http", run, 1000)
