#!/usr/bin/env bash
# Debian packages some tests and benchmarks use: chromium (the mirror page's browser test), nginx and wrk (the
# mirror benchmark's baseline and load), tesseract-ocr (document question answering's OCR), redis-server
# (the shared-state tests and benchmark). Idempotent and
# quiet: installs only what is missing, and only as root with apt-get; otherwise says what to install and
# carries on (those tests then skip with a reason).
set -uo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)  # the mirror benchmark's load generator
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr)  # document-question-answering's OCR
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)  # the shared-state tests (HUBSERVE_STATE_URL=redis://)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    exit 0
  fi
  echo "system-deps: could not install ${missing[*]}; the tests that need them will skip" >&2
else
  echo "system-deps: ${missing[*]} missing (apt-get install ${missing[*]} as root); those tests will skip" >&2
fi
exit 0
