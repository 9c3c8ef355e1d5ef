#!/usr/bin/env bash
# The throughput benchmark on a host with two GPUs, in one command of under 10 minutes:
#   1. every method on the 8B shape on GPU 0 while the 1B shape runs on GPU 1 (each shape's methods share one
#      card, one after another; the two cards do not share work, only the host's CPUs);
#   2. the data-parallel speed-up: CITI stage 2 on the 8B shape, on 1 GPU and on 2 (torchrun, NCCL).
# Usage: bench/throughput_gpu.sh OUTDIR [SECONDS_FOR_STEP_1]
# Then: python bench/throughput_merge.py OUTDIR   (writes bench/results/throughput.{json,md})
set -uo pipefail
OUT=$1; BUDGET=${2:-330}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
# 8B: packed and padded for the two methods the targets compare, packed for the rest; full fine-tuning of 8B
# does not fit one card with fp32 master weights and AdamW (the run says so and is skipped).
CUDA_VISIBLE_DEVICES=0 python3 bench/throughput.py --all --shapes 8b --budget-s "$BUDGET" --micro \
    --methods lora,citi_stage2,importance,citi_stage1,citi_stage3 --packings true,false --out "$OUT" \
    > "$OUT/driver_8b.log" 2>&1 &
p8=$!
CUDA_VISIBLE_DEVICES=1 python3 bench/throughput.py --all --shapes 1b --budget-s "$BUDGET" \
    --methods lora,full,citi_stage2,importance,citi_stage1,citi_stage3 --packings true,false --out "$OUT" \
    > "$OUT/driver_1b.log" 2>&1 &
p1=$!
wait $p8 $p1
cat "$OUT/driver_8b.log" "$OUT/driver_1b.log"
python3 bench/ddp_throughput.py --shape 8b --methods citi_stage2 --gpus 1,2 --out "$OUT" --timeout-s 150 \
    2>&1 | tee "$OUT/driver_ddp.log"
