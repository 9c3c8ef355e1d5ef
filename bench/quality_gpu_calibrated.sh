#!/usr/bin/env bash
# The call threshold measured on one GPU host (bench/plans/method_test_calibrated.txt), in one pool of JOBS runs
# at a time (default 5: four CITI runs beside two baselines ran out of the H100's memory once), STAGGER seconds
# apart; every run also evaluates with calls constrained to the tools' schemas. New runs pin
# generation_batch_size to 16, as every earlier method run, so they compare with those.
# Retention is measured on 40 probes here (120 in the method runs, whose retention numbers stand): these runs are
# for the tool-call side, and the time of one GPU lease is short.
# Usage: bench/quality_gpu_calibrated.sh GGUF OUTDIR   (results in OUTDIR/test_calibrated and test_calibrated_calls;
#                                                      OUTDIR/DONE at the end)
set -uo pipefail
GGUF=$1; OUT=$2
cd "$(dirname "$0")/.." || exit 1
JOBS=${JOBS:-5}; STAGGER=${STAGGER:-25}
mkdir -p "$OUT/test_calibrated"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 > "$OUT/gpu_memory.csv" 2>&1 &
smi=$!
common=(--gguf "$GGUF" --eval-batch-size 32 --probe-limit 40 --constrained --set hyperparameters.generation_batch_size=16
        --split test)
python3 bench/quality.py "${common[@]}" --stagger "$STAGGER" --jobs "$JOBS" --calibrate val \
    --plan bench/plans/method_test_calibrated.txt --out "$OUT/test_calibrated" > "$OUT/test_calibrated.log" 2>&1
# Then three at once: function masking; near-miss negatives (every negative's tools the closest other example's,
# for the live set's near misses); and the shipped defaults choosing their threshold on calls only.
python3 bench/quality.py "${common[@]}" --method citi --masking 0.25 --seed 0 --calibrate val \
    --out "$OUT/test_calibrated" > "$OUT/test_masking.log" 2>&1 &
masking=$!
python3 bench/quality.py "${common[@]}" --method citi --seed 0 --label citi_near1 --calibrate val \
    --set hyperparameters.negatives_near=1.0 --out "$OUT/test_calibrated" > "$OUT/test_near.log" 2>&1 &
near=$!
mkdir -p "$OUT/test_calibrated_calls"
python3 bench/quality.py "${common[@]}" --method citi --seed 0 --calibrate val-calls \
    --out "$OUT/test_calibrated_calls" > "$OUT/test_calibrated_calls.log" 2>&1
wait $masking $near
kill $smi 2>/dev/null
touch "$OUT/DONE"
