#!/usr/bin/env bash
# Every GPU measurement of the project, one table (benchmarks/gpu_check.py says what), in under 8 minutes on an
# H200. Runs from a plain checkout with the machine's own python3 (torch, timm, safetensors, pillow): nothing to
# install. Extra arguments go to gpu_check.py (--device cpu --quick checks the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 480 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
