#!/usr/bin/env bash
# The demo command from README: set up (or reuse) .venv, then run teacher -> cache -> student offline on the standard
# library's docstrings and write demo_out/report.md. Extra arguments go to `python -m examples.demo` (try --help).
# `--chat` (first argument) runs the conversational, cross-template demo instead: `python -m examples.chat_demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ "${1:-}" == "--chat" ]]; then
  shift
  python -m examples.chat_demo --out "${DEMO_OUT:-demo_chat_out}" "$@"
  exit 0
fi
python -m examples.demo --out "${DEMO_OUT:-demo_out}" "$@"
echo "Curves: tensorboard --logdir ${DEMO_OUT:-demo_out}/runs"
