"""Fuzz ``import-bundle`` with mutated bundles: bit flips, truncation, tar header edits, manifest edits,
member reordering, junk. Oracles: nothing but a HubserveError (one line on the CLI) escapes, and the
receiving store is never partial: every revision in it verifies, a refused import promoted nothing,
no staging directory is left behind, models.lock still parses.

    python -m tests.fuzz.bundle --cases 1000 --seed 1
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from sync.errors import ConfigError, HubserveError
from tests.fuzz.common import Findings, main

REPO = "hubserve-test/tiny-llama"
WEIRD = ["../../etc/x", "/abs", "a\r\nb", "\x1b[2J", "", "x" * 300, "a/./b", "models--x--y", "é", "\x00"]


def make_bundles(tmp: Path) -> dict[str, bytes]:
    """A plain and a zstd bundle of the tiny model, exported by the real code."""
    from sync.bundle import export_bundle, plan_export
    from sync.importer import import_folder
    from sync.lock import Lock, LockedModel
    from sync.store import Store
    from tests.fixtures.tiny import tiny_llama_dir

    store = Store(tmp / "source")
    rec = import_folder(store, tiny_llama_dir(), REPO).record
    selection = "include=*;exclude=;allow_pickle=false"
    lock = Lock({"tiny": LockedModel("tiny", REPO, "main", rec.commit, rec.files, selection)})
    out = {}
    for name, zstd in (("plain", False), ("zstd", True)):
        path = tmp / f"tiny.{name}.tar"
        export_bundle(store, plan_export(store, lock, ["tiny"], None), path, zstd=zstd)
        out[name] = path.read_bytes()
    return out


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]  # type: ignore[union-attr]


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _mutate_json(node: Any, rng: random.Random, depth: int = 0) -> Any:
    """One edit somewhere in the manifest: a value replaced, a key dropped or added."""
    if isinstance(node, dict) and node and (depth < 4 and rng.random() < 0.7):
        key = rng.choice(list(node))
        node[key] = _mutate_json(node[key], rng, depth + 1)
        return node
    if isinstance(node, list) and node and (depth < 4 and rng.random() < 0.7):
        i = rng.randrange(len(node))
        node[i] = _mutate_json(node[i], rng, depth + 1)
        return node
    if isinstance(node, dict) and node and rng.random() < 0.3:
        node.pop(rng.choice(list(node)))
        return node
    return rng.choice([
        None, -1, 0, 2**70, 10**400, 1.5, "", rng.choice(WEIRD), "0" * 40, "f" * 64, [], {}, [node, node], True,
        {"a": {"a": {"a": [1]}}}, "x" * 10_000,
    ]) if not isinstance(node, int) or rng.random() < 0.5 else node + rng.choice([-1, 1, 10**6, -node])


def mutate(plain: bytes, zstd: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["bitflip", "truncate", "header", "header", "manifest", "manifest", "members", "junk", "zstd"])
    if kind == "zstd":
        buf = bytearray(zstd)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return kind, bytes(buf) if rng.random() < 0.7 else bytes(buf[: rng.randrange(len(buf))])
    if kind == "bitflip":
        buf = bytearray(plain)
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return kind, bytes(buf)
    if kind == "truncate":
        return kind, plain[: rng.randrange(len(plain))]
    if kind == "junk":
        return kind, plain + rng.randbytes(rng.randint(1, 5000)) if rng.random() < 0.5 else rng.randbytes(2048) + plain
    members = _members(plain)
    if kind == "header":
        return kind, _edit_header(plain, members, rng)
    if kind == "manifest":
        info, data = members[0]
        if rng.random() < 0.15:
            n = rng.choice([1000, 100_000])
            new = b'{"x":' * n + b"1" + b"}" * n
        else:
            doc = _mutate_json(json.loads(data), rng)
            new = json.dumps(doc).encode()
        return kind, _tar([(info, new), *members[1:]])
    op = rng.choice(["reorder", "duplicate", "drop", "rename"])
    if op == "reorder":
        rng.shuffle(members)
    elif op == "duplicate":
        members.insert(rng.randrange(len(members) + 1), rng.choice(members))
    elif op == "drop":
        members.pop(rng.randrange(len(members)))
    else:
        members[rng.randrange(len(members))][0].name = rng.choice(WEIRD) or "x"
    return f"members:{op}", _tar(members)


def _edit_header(plain: bytes, members: list[tuple[tarfile.TarInfo, bytes]], rng: random.Random) -> bytes:
    """Edit one field of one member's 512-byte header, usually with a valid checksum so the tar parser accepts it."""
    at = rng.choice([info.offset for info, _ in members])  # where each member's header block starts
    block = bytearray(plain[at: at + 512])
    field = rng.choice(["name", "size", "type", "link", "mode", "magic"])
    if field == "name":
        value = rng.choice(WEIRD).encode("utf-8", "surrogatepass")[:100]
        block[0:100] = value.ljust(100, b"\0")
    elif field == "size":
        block[124:136] = rng.choice([b"77777777777\0", b"00000000000\0", b"zzzzzzzzzzz\0", b"\x80" + b"\xff" * 11,
                                     f"{rng.randrange(8**11):011o}\0".encode()])
    elif field == "type":
        block[156:157] = rng.choice([b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"S"])
    elif field == "link":
        block[157:257] = rng.choice(WEIRD).encode("utf-8", "surrogatepass")[:100].ljust(100, b"\0")
    elif field == "mode":
        block[100:108] = rng.choice([b"0004755\0", b"0007777\0", b"9999999\0"])
    else:
        block[257:265] = rng.choice([b"ustar  \0", b"GNUtar \0", b"\0" * 8])
    if rng.random() < 0.8:
        block[148:156] = b" " * 8
        block[148:156] = f"{sum(block):06o}\0 ".encode()
    return plain[:at] + bytes(block) + plain[at + 512:]


def _check_store(root: Path, refused: bool) -> list[str]:
    from sync.lock import read_lock
    from sync.store import Store

    store, problems = Store(root), []
    records = store.revisions()
    if refused and records:
        problems.append(f"refused, yet {len(records)} revision(s) promoted")
    for rec in records:
        problems += store.verify(rec)
    if store.tmp_dir.is_dir():
        problems += [f"left in the temp area: {p.name}" for p in store.tmp_dir.iterdir()]
    rec_dir = root / ".hubserve" / "revisions"
    if rec_dir.is_dir():
        problems += [f"temp record {p.name}" for p in rec_dir.rglob(".*.tmp")]
    try:
        read_lock(root / "models.lock")
    except ConfigError as e:
        problems.append(f"models.lock unreadable: {e}")
    return problems


def _run_case(tmp: Path, data: bytes, kind: str, via_cli: bool, findings: Findings) -> None:
    from sync.bundle import import_bundle
    from sync.store import Store

    bundle, root = tmp / "case.tar", tmp / "inside"
    bundle.write_bytes(data)
    shutil.rmtree(root, ignore_errors=True)
    refused = False
    if via_cli:
        res = subprocess.run([sys.executable, "-m", "server.cli", "import-bundle", str(bundle), "--store", str(root)],
                             capture_output=True, text=True, timeout=120, cwd=tmp)
        output = res.stdout + res.stderr
        refused = res.returncode != 0
        findings.statuses[f"cli exit {res.returncode}"] += 1
        if "Traceback" in output or res.returncode not in (0, 1, 2):
            findings.fail("traceback", kind, f"CLI exit {res.returncode}: {output[-300:]!r}", data[:2048])
        elif refused and len([line for line in res.stderr.splitlines() if line.startswith("error")]) != 1:
            findings.fail("message", kind, f"refusal is not one error line: {res.stderr[-300:]!r}", data[:2048])
    else:
        try:
            import_bundle(Store(root), [bundle], None, root / "models.lock")
            findings.statuses["imported"] += 1
        except HubserveError as e:
            refused = True
            findings.statuses[type(e).__name__] += 1
        except Exception as e:  # the oracle: a bundle gives a clear error, never another exception
            refused = True
            findings.statuses[type(e).__name__] += 1
            findings.fail("exception", kind, f"{type(e).__name__}: {str(e)[:200]}", data[:2048])
    if root.exists():
        for problem in _check_store(root, refused):
            findings.fail("partial store", kind, problem, data[:2048])


def run(cases: int, rng: random.Random, cli_every: int = 25) -> list[Findings]:
    findings = Findings("import-bundle", 0)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hubserve-fuzz-bundle-") as tmp_s:
        tmp = Path(tmp_s)
        bundles = make_bundles(tmp)
        for i in range(cases):
            kind, data = mutate(bundles["plain"], bundles["zstd"], rng)
            findings.cases += 1
            findings.kinds[kind.split(":")[0]] += 1
            _run_case(tmp, data, kind, via_cli=cli_every > 0 and i % cli_every == cli_every - 1, findings=findings)
    findings.seconds = time.monotonic() - started
    return [findings]


if __name__ == "__main__":
    main("bundle", run, 500)
