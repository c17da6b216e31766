#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch==2.13.0 (CPU build) and ffnkit (editable).
# Re-installs only when pyproject.toml or the extras changed. Models and corpora are fetched later, on first use.
# FFNKIT_EXTRAS picks the optional extras (default: test); the test command adds quantize (torchao).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
[ -x .venv/bin/python ] || "$py" -m venv .venv
extras=${FFNKIT_EXTRAS:-test}
hash=$(sha256sum pyproject.toml | cut -c1-16)
{ read -r had_hash had_extras < .venv/.ffnkit-installed; } 2>/dev/null || true  # absent on a fresh clone
up_to_date=$([ "${had_hash:-}" = "$hash" ] && echo yes || echo no)
for e in ${extras//,/ }; do [[ ",${had_extras:-}," == *",$e,"* ]] || up_to_date=no; done
if [ "$up_to_date" = no ]; then
  [ "${had_hash:-}" = "$hash" ] && extras="$had_extras,$extras"  # keep what is installed already
  echo "setting up .venv (torch 2.13.0 CPU, transformers 5, ffnkit)…" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0   # pinned: a looser spec pulls a multi-GB CUDA build
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$hash $extras" > .venv/.ffnkit-installed
fi
