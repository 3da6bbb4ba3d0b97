"""CPU time of one API-key check (named key among 100 in the keys file, and a flat key).

Run: .venv/bin/python bench/bench_auth.py   (CPU time, so a busy machine does not inflate it)
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import timeit
from pathlib import Path

from server.ops.auth import KeyChecker
from server.ops.keys import KeyRing, new_key, write_keys
from server.settings import hash_key


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    made = [new_key(f"k{i}") for i in range(100)]
    write_keys(folder / "keys.toml", {record.id: record for _, record in made})
    checker = KeyChecker(frozenset({hash_key("flat-key")}), KeyRing(folder / "keys.toml"))
    n = 20_000
    for label, key in (("named key (1 of 100)", made[50][0]), ("flat key", "flat-key"), ("wrong key", "hs_x")):
        def check(key: str = key) -> None:
            with contextlib.suppress(Exception):
                checker.principal(key)

        seconds = timeit.timeit(check, number=n, timer=time.process_time) / n
        print(f"{label}: {seconds * 1e6:.1f} us CPU per check (incl. the keys file stat)")


if __name__ == "__main__":
    main()
