#!/usr/bin/env bash
# One-time setup: a virtual environment in .venv with a CPU torch and dsv3 (+ dev tools).
# torch is installed first and pinned so that pip never pulls a multi-GB CUDA build on a CPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==${DSV3_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[dev]"
