#!/usr/bin/env bash
# The quality benchmark on the GPUs of one host, resumable: a sweep on the validation split, then each method's
# best configuration with 3 seeds on the test split. Runs whose result file exists are skipped, so a command cut
# off by a time limit is simply run again. Usage: bench/quality_gpu.sh GGUF OUTDIR [DEADLINE_SECONDS]
#   GPUS=0,1   cards to spread the runs over (default: every card nvidia-smi lists)
#   JOBS=N     runs at a time per card (default: one per 20 GB of the smallest card, at most 6; a run peaks near
#              16 GB, and eleven on one 80 GB card ran out of memory)
set -euo pipefail
GGUF=$1; OUT=$2; DEADLINE=${3:-540}
cd "$(dirname "$0")/.."
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
if [ -z "${GPUS:-}" ]; then GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -); fi
if [ -z "${JOBS:-}" ]; then
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | sort -n | head -1)
    JOBS=$(( mib / 20480 )); [ "$JOBS" -gt 6 ] && JOBS=6; [ "$JOBS" -lt 1 ] && JOBS=1
fi
echo "GPUs $GPUS, $JOBS run(s) at a time on each"
# Evaluation in batches of 128: the decode loop is host-bound, so fewer, wider batches finish sooner.
common=(--gguf "$GGUF" --jobs "$JOBS" --gpus "$GPUS" --eval-batch-size 128)

# 1. Sweep on the validation split (one seed): each method's learning rate, CITI's expert scale, and CITI
#    variants that double as ablations (no routing loss or a stronger one, other MOLoRA fractions, no UCO stage,
#    random instead of importance-ranked components). All in one pool.
mkdir -p "$OUT"
cat > "$OUT/sweep_plan.txt" <<'PLAN'
--method base
--method lora --lr 1e-4,2e-4,5e-4,1e-3
--method full --lr 1e-5,3e-5,1e-4
--method citi --lr 5e-4,1e-3,2e-3 --alpha 16,32
--method citi --lr 1e-3 --alpha 32 --beta 0
--method citi --lr 1e-3 --alpha 32 --molora-fraction 0.1,0.3
--method citi --lr 1e-3 --alpha 32 --molora-fraction 0.3 --uco-fraction 0
--method citi --lr 1e-3 --alpha 32 --molora-fraction 0.3 --selection random
--method citi --lr 1e-3 --alpha 32 --molora-fraction 0.3 --beta 1e-3,1e-2
PLAN
python3 bench/quality.py "${common[@]}" --plan "$OUT/sweep_plan.txt" --split val --seed 0 \
    --deadline "$(left)" --out "$OUT/sweep" || true   # a failed run is reported; the others still count

# 2. Each method's best configuration on the test split, 3 seeds (the base model once: nothing is trained).
#    Only from a complete sweep: a choice among the runs that happened to finish is no choice.
if ! python3 bench/quality.py "${common[@]}" --plan "$OUT/sweep_plan.txt" --split val --seed 0 --out "$OUT/sweep" \
        --missing; then
    echo "the sweep is not complete: run this command again"
    exit 0
fi
python3 bench/quality_select.py "$OUT/sweep" > "$OUT/test_plan.txt"
cat "$OUT/test_plan.txt"
python3 bench/quality.py "${common[@]}" --plan "$OUT/test_plan.txt" --split test --seed 0,1,2 \
    --deadline "$(left)" --out "$OUT/test" || true
