#!/usr/bin/env bash
# The quality benchmark on one GPU, resumable: a sweep on the validation split, then each method's best
# configuration with 3 seeds on the test split. Runs whose result file exists are skipped, so a command cut
# off by a time limit is simply run again. Usage: bench/quality_gpu.sh GGUF OUTDIR [DEADLINE_SECONDS]
set -euo pipefail
GGUF=$1; OUT=$2; DEADLINE=${3:-540}
# At most about 4 runs at once per 80 GB card: each run peaks at 16-28 GB (11 at once ran out of memory on an H100).
JOBS=${JOBS:-4}
cd "$(dirname "$0")/.."
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }

# 1. Sweep on the validation split (one seed), one method after another, JOBS runs at a time: the learning rate
#    of each method, and CITI's expert scale.
python3 bench/quality.py --gguf "$GGUF" --split val --seed 0 --jobs "$JOBS" --deadline "$(left)" --out "$OUT/sweep" \
    --method base,lora --lr 1e-4,2e-4,5e-4 || true   # a failed run is reported; the others still count
python3 bench/quality.py --gguf "$GGUF" --split val --seed 0 --jobs "$JOBS" --deadline "$(left)" --out "$OUT/sweep" \
    --method full --lr 1e-5,3e-5,1e-4 || true
python3 bench/quality.py --gguf "$GGUF" --split val --seed 0 --jobs "$JOBS" --deadline "$(left)" --out "$OUT/sweep" \
    --method citi --lr 5e-4,1e-3 --alpha 16,32 || true

# 2. Each method's best configuration on the test split, 3 seeds (the base model once: nothing is trained).
python3 bench/quality_select.py "$OUT/sweep" > "$OUT/selection.txt"
cat "$OUT/selection.txt"
while read -r method flags; do
    seeds=0,1,2; [ "$method" = base ] && seeds=0
    # shellcheck disable=SC2086
    python3 bench/quality.py --gguf "$GGUF" --split test --seed "$seeds" --jobs "$JOBS" --deadline "$(left)" \
        --out "$OUT/test" --method "$method" $flags || true
done < "$OUT/selection.txt"
