#!/usr/bin/env bash
# Kaggle notebook with one 16 GB P100 (sm_60: fp16 only): distil the Qwen3-MoE teacher huihui-ai/Huihui-MoE-1B-A0.6B
# into HuggingFaceTB/SmolLM-135M on wikitext-103 from the hub. Run from the repository root after `bash scripts/setup.sh`
# (on Kaggle, keep the preinstalled CUDA torch: `pip install -e .` is enough).
#
# Disk: the teacher's vocabulary (151,669) needs uint32 ids, so top-256 costs about 1.55 KB/token before lzf
# (measure yours: `python -m bench --only storage`); /kaggle/working holds 20 GB, hence --max-samples below.
set -euo pipefail
OUT=${OUT:-/kaggle/working}
export TOKENIZERS_PARALLELISM=false

# 1. The teacher runs once, in fp16, over the training split (resumable: rerun with --resume after a time-out).
cache_tools build-cache --teacher huihui-ai/Huihui-MoE-1B-A0.6B \
  --dataset Salesforce/wikitext:wikitext-103-raw-v1 --split train --max-samples 120000 \
  --max-length 512 --top-k 256 --dtype fp16 --batch-size 8 --compression lzf --output "$OUT/cache"
# Held-out targets for evaluation curves and early stopping.
cache_tools build-cache --teacher huihui-ai/Huihui-MoE-1B-A0.6B \
  --dataset Salesforce/wikitext:wikitext-103-raw-v1 --split validation \
  --max-length 512 --top-k 256 --dtype fp16 --batch-size 8 --compression lzf --output "$OUT/eval_cache"
cache_tools verify "$OUT/cache"
# Before spending GPU hours: how much of the teacher's top-k the SmolLM tokenizer can receive.
cache_tools inspect "$OUT/cache"
python -m distill.coverage "$OUT/cache" --student-tokenizer HuggingFaceTB/SmolLM-135M

# 2. The student trains from the cache alone (no teacher in memory): fp16 + DeepSpeed ZeRO-2 (dynamic loss scaling).
accelerate launch --config_file launch/accelerate/p100_fp16_single_gpu.yaml -m distill.train \
  launch/recipes/kaggle_p100.yaml --cache "$OUT/cache" --eval_cache "$OUT/eval_cache" --output_dir "$OUT/student_run"

# Curves: tensorboard --logdir "$OUT/student_run"; the exported student: "$OUT/student_run/student".
