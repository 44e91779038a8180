#!/usr/bin/env bash
# The project's test command: set up (or reuse) .venv, lint, run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# One thread per process unless you say otherwise: the tests' models are tiny, several tests run two ranks at once,
# and on a busy machine a second thread waits at every barrier for a sibling pushed off its core.
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ruff check .
python -m pytest -q "$@"
