#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch==2.13.0 (CPU build) and ffnkit (editable).
# Re-installs only when pyproject.toml changed. Models and corpora are fetched later, on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
[ -x .venv/bin/python ] || "$py" -m venv .venv
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.ffnkit-installed 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (torch 2.13.0 CPU, transformers 5, ffnkit)…" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0   # pinned: a looser spec pulls a multi-GB CUDA build
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > .venv/.ffnkit-installed
fi
