#!/usr/bin/env bash
# Set up (or reuse) .venv, then lint, type-check and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not e2e" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/system-deps.sh
VENV="${HUBSERVE_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
echo "== ruff" && ruff check .
echo "== mypy" && mypy
echo "== pytest"
exec pytest -p no:cacheprovider -ra --durations=25 --timeout=1800 "$@"
