"""Short seeded runs of the fuzzers (tests/fuzz; long runs and their results: docs/fuzzing.md).

Each target's run is shared by two tests: no oracle breaks beyond those known on this branch (strict),
and the target is clean (xfail, not strict, while a known defect is being fixed on another branch).
Remove a target's KNOWN entry once its fix is merged: the clean test then guards it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.fuzz import bundle, config, http
from tests.fuzz.common import Findings

pytestmark = pytest.mark.integration
SEED = 16

# Oracles that break on this branch before the parallel fixes are merged (see docs/fuzzing.md).
KNOWN: dict[str, set[str]] = {
    "import-bundle": {"exception"},  # a manifest of the wrong JSON shape (AttributeError), deep nesting
}
RUNS: dict[str, Callable[[], list[Findings]]] = {
    "config": lambda: config.run(300, random.Random(SEED)),
    "http": lambda: http.run(150, random.Random(SEED)),
    "bundle": lambda: bundle.run(100, random.Random(SEED), cli_every=50),
}
TARGETS = {"models.toml": "config", "keys.toml": "config", "http mirror": "http", "http daemon": "http",
           "import-bundle": "bundle"}


@pytest.fixture(scope="module")
def results() -> Callable[[str], Findings]:
    done: dict[str, list[Findings]] = {}

    def get(target: str) -> Findings:
        run = TARGETS[target]
        if run not in done:
            done[run] = RUNS[run]()
        return next(f for f in done[run] if f.target == target)

    return get


@pytest.mark.parametrize("target", list(TARGETS))
def test_no_new_oracle_breaks(target: str, results: Callable[[str], Findings]) -> None:
    findings = results(target)
    assert findings.cases >= 100
    unexpected = set(findings.by_oracle()) - KNOWN.get(target, set())
    assert not unexpected, findings.summary()


@pytest.mark.parametrize(
    "target",
    [pytest.param(t, marks=pytest.mark.xfail(strict=False, reason=f"known on this branch: {sorted(KNOWN[t])}"))
     if t in KNOWN else t for t in TARGETS],
)
def test_target_is_clean(target: str, results: Callable[[str], Findings]) -> None:
    findings = results(target)
    assert not findings.failures, findings.summary()
