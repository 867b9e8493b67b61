#!/usr/bin/env bash
# Set up .venv (demo extras) and run the offline demo: corpus -> train -> score -> evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/spai demo "$@"
