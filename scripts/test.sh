#!/usr/bin/env bash
# Set up .venv (dev extras) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
