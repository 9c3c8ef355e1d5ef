#!/usr/bin/env bash
# The method issue's quality benchmark on one GPU host, in the background. Runs with a result file are skipped,
# and the results already measured (bench/results/quality_raw/method_h100/) are copied in first, so only what is
# missing runs. Two pools share the card from the start: CITI's validation sweep (bench/plans/method_val.txt) and
# the test runs (bench/plans/method_test_baselines.txt with seeds 0,1,2, bench/plans/method_test_ablations.txt
# with seed 0). As soon as the sweep is complete, the configuration chosen on it (retention-band rule) runs on
# the test split with seeds 0,1,2.
# At most JOBS runs at once per pool (default 2, so 4 on the card): CITI's importance scoring and full
# fine-tuning each peak near 23 GB, and ten runs at once on an 80 GB H100 died of CUDA OOM.
# Usage: bench/quality_gpu_method.sh GGUF OUTDIR        (touches OUTDIR/DONE when everything has finished)
set -uo pipefail
GGUF=$1; OUT=$2
cd "$(dirname "$0")/.." || exit 1
JOBS=${JOBS:-2}
SEEDED=bench/results/quality_raw/method_h100
mkdir -p "$OUT/val" "$OUT/test"
cp -n "$SEEDED"/val/*.json "$OUT/val/" 2>/dev/null
cp -n "$SEEDED"/test/*.json "$OUT/test/" 2>/dev/null
common=(--gguf "$GGUF" --eval-batch-size 32 --probe-limit 120)
python3 bench/quality.py "${common[@]}" --jobs "$JOBS" --plan bench/plans/method_val.txt --split val --seed 0 \
    --out "$OUT/val" > "$OUT/val.log" 2>&1 &
val=$!
{
    python3 bench/quality.py "${common[@]}" --jobs "$JOBS" --plan bench/plans/method_test_ablations.txt \
        --split test --seed 0 --out "$OUT/test"
    python3 bench/quality.py "${common[@]}" --jobs "$JOBS" --plan bench/plans/method_test_baselines.txt \
        --split test --seed 0,1,2 --out "$OUT/test"
} > "$OUT/test.log" 2>&1 &
tests=$!
wait $val
python3 bench/quality_select.py --rule=retention-band "$OUT/val" > "$OUT/test_plan.txt"
grep -- '--method citi' "$OUT/test_plan.txt" | head -1 > "$OUT/test_plan_citi.txt"
echo "chosen on validation: $(cat "$OUT/test_plan_citi.txt")"
python3 bench/quality.py "${common[@]}" --jobs "$JOBS" --plan "$OUT/test_plan_citi.txt" --split test \
    --seed 0,1,2 --out "$OUT/test" > "$OUT/test_citi.log" 2>&1
wait $tests
touch "$OUT/DONE"
