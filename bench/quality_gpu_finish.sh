#!/usr/bin/env bash
# Finish a quality benchmark whose sweep is complete except for some runs, inside one 10-minute command:
# the test runs of the methods whose choice is already settled start at once, beside the missing sweep runs;
# the remaining methods' test runs start as soon as their sweep is complete.
# Usage: bench/quality_gpu_finish.sh GGUF OUTDIR SETTLED_TEST_PLAN SWEEP_LEFTOVER_PLAN [DEADLINE_SECONDS]
#   SETTLED_TEST_PLAN:    quality.py --plan lines for the test split (methods whose sweep is complete)
#   SWEEP_LEFTOVER_PLAN:  quality.py --plan lines of the sweep runs still missing (validation split)
set -uo pipefail
GGUF=$1; OUT=$2; SETTLED=$3; LEFTOVER=$4; DEADLINE=${5:-540}
cd "$(dirname "$0")/.."
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)}
common=(--gguf "$GGUF" --gpus "$GPUS" --eval-batch-size 128)
python3 bench/quality.py "${common[@]}" --jobs 2 --plan "$SETTLED" --split test --seed 0,1,2 --out "$OUT/test" \
    --deadline "$DEADLINE" > "$OUT/finish_settled.log" 2>&1 &
settled=$!
python3 bench/quality.py "${common[@]}" --jobs 2 --plan "$LEFTOVER" --split val --seed 0 --out "$OUT/sweep" \
    --deadline "$DEADLINE" || true
python3 bench/quality_select.py "$OUT/sweep" > "$OUT/test_plan.txt"
cat "$OUT/test_plan.txt"
# The methods of the leftover plan, now chosen on the complete sweep.
methods=$(grep -o -- '--method [a-z]*' "$LEFTOVER" | awk '{print $2}' | sort -u | paste -sd'|' -)
grep -E -- "--method ($methods)( |$)" "$OUT/test_plan.txt" > "$OUT/test_plan_rest.txt"
python3 bench/quality.py "${common[@]}" --jobs 3 --plan "$OUT/test_plan_rest.txt" --split test --seed 0,1,2 \
    --out "$OUT/test" || true
wait $settled
cat "$OUT/finish_settled.log"
