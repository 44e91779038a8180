#!/usr/bin/env bash
# Create (or reuse) .venv and install the project with its test extras. torch goes first, pinned: a plain `torch`
# requirement on a machine without it would pull the CUDA build (GBs); users with GPUs may install their own torch
# before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e '.[test,demo]'
