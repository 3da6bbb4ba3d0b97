"""Fuzz models.toml and keys.toml parsing: mutated files must give a ConfigError with a one-line message,
never another exception.

    python -m tests.fuzz.config --cases 5000 --seed 1
"""

from __future__ import annotations

import random
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from sync.errors import ConfigError
from tests.fuzz.common import Findings, main

MODELS_TOML = """\
[store]
path = "store"
keep_revisions = 2

[upstream]
endpoint = "http://127.0.0.1:8090"
token_env = "HF_TOKEN"
max_workers = 8
retries = 6

[daemon]
interval = 300
listen = "127.0.0.1:8091"
webhook_secret_env = "HUBSERVE_WEBHOOK_SECRET"
backoff_max = 600
prune = true
verify_interval = "7d"

[[models]]
name = "smollm2"
repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
revision = "main"
task = "text-generation"
backend = "auto"
follow = true
include = ["*.safetensors", "*.json", "tokenizer*"]
exclude = []
allow_pickle = false
timeout_s = 60
[models.engine]
dtype = "auto"
max_model_len = 4096

[[models]]
name = "minilm"
repo = "sentence-transformers/all-MiniLM-L6-v2"
revision = "0123456789abcdef0123456789abcdef01234567"
task = "feature-extraction"
"""

TOKENS = [
    "[", "]", "[[", "]]", "{", "}", "=", '"', "'", "'''", '"""', ",", "\n", "#", ".", "\\", "\\u0000", "\\x",
    "inf", "nan", "-inf", "1e999", "9" * 30, "-", "0x", "0o7", "true", "1979-05-27T07:32:00Z", "[models]",
    "[[models]]", "[daemon]", "[store]", "[models.engine]", "name", "repo", "revision = ", "\x00", "\x1b[31m",
    "\x7f", "\r", "\t", "\u2028", "é", "../", "models--a--b",
]
VALUES: list[Callable[[random.Random], Any]] = [
    lambda r: r.choice([0, -1, 1, 2**63 - 1, -(2**63), 10**18]),
    lambda r: r.choice([float("inf"), float("nan"), -0.0, 1e308, 1e-308]),
    lambda r: r.choice(["", "x" * 100_000, "a\nb", "\x00", "\x1b]0;x\x07", "org/../etc", "../../x", "%2F", "é" * 10]),
    lambda r: r.choice([True, False]),
    lambda r: [r.randint(0, 9)] * r.randint(0, 5),
    lambda r: {"k": "v", "nested": {"deep": [1, 2]}},
    lambda r: "0" * 40,
    lambda r: r.choice(["main", "7d", "off", "1s", "weekly", "-5m", "auto", "vllm", "text-generation"]),
]


def _keys_toml() -> str:
    from server.ops.keys import new_key

    records = [new_key(f"key-{i}", models=("smollm2",) if i else None, rpm=10 * (i + 1))[1] for i in range(2)]
    return "# hubserve keys\n" + tomli_w.dumps({"keys": [r.to_toml() for r in records]})


def mutate_text(text: str, rng: random.Random) -> tuple[str, bytes]:
    """(kind, bytes): a byte, token, line, structure or nesting mutation of ``text``."""
    data = text.encode()
    kind = rng.choice(["bytes", "token", "line", "structure", "structure", "nesting", "encoding"])
    if kind == "bytes":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return kind, bytes(buf)
    if kind == "token":
        s = text
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(s))
            s = s[:i] + rng.choice(TOKENS) + s[i + rng.choice([0, 0, 1, 5]):]
        return kind, s.encode("utf-8", "surrogatepass")
    if kind == "line":
        lines = text.splitlines(keepends=True)
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        op = rng.choice(["dup", "del", "swap"])
        if op == "dup":
            lines.insert(j, lines[i])
        elif op == "del":
            del lines[i]
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return kind, "".join(lines).encode()
    if kind == "structure":
        doc = tomllib.loads(text)
        _mutate_doc(doc, rng)
        try:
            return kind, tomli_w.dumps(doc).encode()
        except (TypeError, ValueError):  # tomli_w refuses a shape (e.g. a value TOML cannot hold)
            return kind, text.encode()
    if kind == "nesting":
        n = rng.choice([50, 500, 5000, 50_000])
        opener, closer = rng.choice([("[", "]"), ("{a=", "}"), ("[{a=", "}]")])
        line = f"deep = {opener * n}1{closer * n}\n"
        where = rng.choice(["top", "daemon", "model"])
        if where == "top":
            return kind, (line + text).encode()
        anchor = "[daemon]\n" if where == "daemon" else "[models.engine]\n"
        return kind, text.replace(anchor, anchor + line, 1).encode() if anchor in text else (line + text).encode()
    # encoding: a BOM, UTF-16, invalid UTF-8, NUL bytes
    return kind, rng.choice([b"\xef\xbb\xbf" + data, text.encode("utf-16"), data[:40] + b"\xff\xfe\x80" + data[40:],
                             data.replace(b"\n", b"\x00\n", 3), b"\r".join(data.split(b"\n"))])


def _mutate_doc(doc: dict[str, Any], rng: random.Random) -> None:
    """Replace, delete or add one value somewhere in the parsed document."""
    node: Any = doc
    for _ in range(rng.randint(1, 4)):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if not isinstance(node[key], dict | list) or rng.random() < 0.3:
                break
            node = node[key]
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            node = rng.choice(node)
        else:
            break
    if not isinstance(node, dict):
        return
    op = rng.choice(["set", "set", "del", "add"])
    if op == "add" or not node:
        node[rng.choice(["unknown", "name", "repo", "engine", "models", "keys", "x" * 200])] = rng.choice(VALUES)(rng)
    elif op == "del":
        del node[rng.choice(list(node))]
    else:
        node[rng.choice(list(node))] = rng.choice(VALUES)(rng)


def _check(findings: Findings, kind: str, data: bytes, parse: Callable[[Path], object], path: Path) -> None:
    path.write_bytes(data)
    try:
        parse(path)
        findings.statuses["accepted"] += 1
    except ConfigError as e:
        findings.statuses["ConfigError"] += 1
        msg = str(e)
        if not msg.strip() or "\n" in msg or "\r" in msg:
            findings.fail("message", kind, f"ConfigError message is empty or spans lines: {msg[:200]!r}", data)
    except Exception as e:  # the oracle: nothing but ConfigError may escape
        findings.statuses[type(e).__name__] += 1
        findings.fail("exception", kind, f"{type(e).__name__}: {str(e)[:200]}", data)


def run(cases: int, rng: random.Random) -> list[Findings]:
    from server.ops.keys import read_keys
    from sync.manifest import load_config

    keys_text = _keys_toml()
    out = []
    with tempfile.TemporaryDirectory(prefix="hubserve-fuzz-config-") as tmp:
        for target, seed, parse, name in (
            ("models.toml", MODELS_TOML, lambda p: load_config(p), "models.toml"),
            ("keys.toml", keys_text, read_keys, "keys.toml"),
        ):
            findings = Findings(target, 0)
            import time

            started = time.monotonic()
            for _ in range(cases):
                kind, data = mutate_text(seed, rng)
                findings.cases += 1
                findings.kinds[kind] += 1
                _check(findings, kind, data, parse, Path(tmp) / name)
            findings.seconds = time.monotonic() - started
            out.append(findings)
    return out


if __name__ == "__main__":
    main("config", run, 2000)
