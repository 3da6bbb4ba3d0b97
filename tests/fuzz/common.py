"""What the fuzzers share: the findings they collect and their command line."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Finding:
    oracle: str  # which rule broke: "5xx", "traceback", "dead", "desync", "partial store", "exception"
    case: str  # its kind and number: the same --seed and --cases reproduce it
    detail: str
    reproducer: str  # the bytes or text, as a Python literal (cut at 600 characters)


@dataclass
class Findings:
    target: str
    seed: int
    cases: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, oracle: str, case: str, detail: str, data: object) -> None:
        self.failures.append(Finding(oracle, f"{case} #{self.cases}", detail, repr(data)[:600]))

    def first(self, oracle: str, n: int) -> list[Finding]:
        return [f for f in self.failures if f.oracle == oracle][:n]

    def by_oracle(self) -> Counter[str]:
        return Counter(f.oracle for f in self.failures)

    def summary(self) -> str:
        head = f"{self.target}: {self.cases} cases (seed {self.seed}) in {self.seconds:.1f}s: "
        head += ", ".join(f"{n} {o}" for o, n in sorted(self.by_oracle().items())) or "0 failures"
        lines = [head, "  kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))]
        if self.statuses:
            lines.append("  outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(self.statuses.items())))
        seen: set[tuple[str, str]] = set()
        for f in self.failures:  # the first of each (oracle, kind)
            kind = f.case.split(" #")[0].split(":")[0]
            if (f.oracle, kind) not in seen:
                seen.add((f.oracle, kind))
                lines.append(f"  FAIL {f.oracle} [{f.case}] {f.detail}\n      reproducer: {f.reproducer}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target, "seed": self.seed, "cases": self.cases, "seconds": round(self.seconds, 1),
            "kinds": dict(self.kinds), "outcomes": dict(self.statuses), "failures": dict(self.by_oracle()),
            "examples": [f.__dict__ for o in sorted(self.by_oracle()) for f in self.first(o, 10)],
        }


def main(name: str, run: Callable[[int, random.Random], list[Findings]], default_cases: int) -> None:
    """``python -m tests.fuzz.<name> --cases N --seed S [--json FILE]``; exit 1 when an oracle broke."""
    parser = argparse.ArgumentParser(prog=f"python -m tests.fuzz.{name}", description=sys.modules["__main__"].__doc__)
    parser.add_argument("--cases", type=int, default=default_cases, help="cases per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results (counts and the first failures) to this file")
    args = parser.parse_args()
    started = time.monotonic()
    results = run(args.cases, random.Random(args.seed))
    for r in results:
        r.seed = args.seed
        print(r.summary())
    print(f"total {sum(r.cases for r in results)} cases in {time.monotonic() - started:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in results], f, indent=1)
    sys.exit(1 if any(r.failures for r in results) else 0)
