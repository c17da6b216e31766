#!/usr/bin/env bash
# Set up (first run only), then run the whole test suite: tiny random models of every family (unit),
# the real default model and corpora (integration; fetched into the cache on first use). GPU tests skip
# where no GPU is present.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
FFNKIT_EXTRAS=test,quantize,lora bash "$here/scripts/setup.sh"  # quantisation and LoRA healing are tested too
cd "$here"
exec .venv/bin/python -m pytest -q "$@"
