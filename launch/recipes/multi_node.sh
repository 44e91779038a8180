#!/usr/bin/env bash
# Several GPUs on one or more machines. Run the same script on every machine with its MACHINE_RANK:
#   NUM_MACHINES=2 GPUS_PER_MACHINE=8 MACHINE_RANK=0 MAIN_IP=10.0.0.1 bash launch/recipes/multi_node.sh   # machine 0
#   NUM_MACHINES=2 GPUS_PER_MACHINE=8 MACHINE_RANK=1 MAIN_IP=10.0.0.1 bash launch/recipes/multi_node.sh   # machine 1
# OUT must be a folder every machine sees (shared file system): the cache is written once and read by all ranks.
# One machine only: NUM_MACHINES=1 (MAIN_IP is then ignored).
set -euo pipefail
NUM_MACHINES=${NUM_MACHINES:-1}
GPUS_PER_MACHINE=${GPUS_PER_MACHINE:-8}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_IP=${MAIN_IP:-127.0.0.1}
PORT=${PORT:-29500}
OUT=${OUT:-/shared/distill}
TEACHER=${TEACHER:-huihui-ai/Huihui-MoE-1B-A0.6B}
DATASET=${DATASET:-Salesforce/wikitext:wikitext-103-raw-v1}
export TOKENIZERS_PARALLELISM=false
NPROC=$((NUM_MACHINES * GPUS_PER_MACHINE))

# 1. Cache: every rank builds a disjoint set of shards (shard index % world size == rank); rank 0 writes the one
#    manifest after a barrier. The result is identical to a single-process build.
torchrun --nnodes "$NUM_MACHINES" --nproc_per_node "$GPUS_PER_MACHINE" --node_rank "$MACHINE_RANK" \
  --master_addr "$MAIN_IP" --master_port "$PORT" -m cache_tools build-cache \
  --teacher "$TEACHER" --dataset "$DATASET" --split train --max-length 1024 --top-k 256 --dtype bf16 \
  --batch-size 16 --compression lzf --output "$OUT/cache" --resume

# 2. Student: DeepSpeed ZeRO-2 across all GPUs, bf16 (Ampere or newer; on V100/T4 use --fp16 and zero2_fp16.json).
accelerate launch --quiet --config_file launch/accelerate/multi_gpu_zero2.yaml \
  --num_machines "$NUM_MACHINES" --num_processes "$NPROC" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_IP" --main_process_port "$PORT" \
  -m distill.train launch/recipes/multi_node.yaml --cache "$OUT/cache" --output_dir "$OUT/student_run"
