#!/usr/bin/env bash
# Quality runs on one GPU host from a plan (PLAN, default bench/plans/method_test_calibrated.txt), in one pool
# of JOBS runs at a time (default 5 on an 80 GB card, 8 on a larger one), STAGGER seconds apart, in the plan's
# order (the runs the method issue's targets read first, so a lease that ends early keeps them). New runs pin
# generation_batch_size to 16, as every earlier method run, so they compare with those.
# Retention is measured on 40 probes here (120 in the method runs, whose retention numbers stand): these runs are
# for the tool-call side, and the time of one GPU lease is short. Constrained decoding was measured in the fifth
# session (bench/results/quality_live.md) and is not run again.
# Usage: bench/quality_gpu_calibrated.sh GGUF OUTDIR   (results in OUTDIR/<the plan's name>, e.g.
#        OUTDIR/method_next; the pool's log beside it; OUTDIR/DONE at the end)
set -uo pipefail
GGUF=$1; OUT=$2
cd "$(dirname "$0")/.." || exit 1
# Five runs at a time is the edge of an 80 GB card (three CITI runs beside two baselines ran out of memory once, four
# beside two another time: a CITI run peaks at 22 GiB while it trains); growable memory segments and the pool's
# retry (one run fewer at a time, in the plan's order) cover it. A 141 GB card is given eight.
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
JOBS=${JOBS:-$([ "${mem_mib:-0}" -gt 120000 ] && echo 8 || echo 5)}; STAGGER=${STAGGER:-25}
PLAN=${PLAN:-bench/plans/method_test_calibrated.txt}
RUNS="$OUT/$(basename "$PLAN" .txt)"
mkdir -p "$RUNS"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 > "$OUT/gpu_memory.csv" 2>&1 &
smi=$!
python3 bench/quality.py --gguf "$GGUF" --eval-batch-size 32 --probe-limit 40 \
    --set hyperparameters.generation_batch_size=16 --split test \
    --stagger "$STAGGER" --jobs "$JOBS" --in-order \
    --plan "$PLAN" --out "$RUNS" > "$RUNS.log" 2>&1
kill $smi 2>/dev/null
touch "$OUT/DONE"
