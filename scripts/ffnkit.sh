#!/usr/bin/env bash
# Set up (first run only), then run the ffnkit command line with the given arguments.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
exec "$here/.venv/bin/ffnkit" "$@"
