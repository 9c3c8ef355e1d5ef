#!/usr/bin/env bash
# A quick check (about a minute) that bench/quality.py runs on this host before hours of GPU time go into it:
# a tiny random Llama with the SmolLM2 tokenizer, CITI with the shipped defaults and with the paper preset, and
# full fine-tuning with CITI's data, each a few steps and a few evaluation cases.
# Usage: bench/quality_smoke.sh OUTDIR       (needs the tokenizer under $CITI_CACHE_DIR, see citi_engine/testing.py)
set -euo pipefail
OUT=$1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
python3 -c "from citi_engine.testing import make_tiny_model_dir as m; m('$OUT/tiny', layers=4, hidden=128, intermediate=256)"
small=(--model "$OUT/tiny" --limit-train 48 --max-steps 8 --batch-size 4 --limit-test 10 --probe-limit 8
       --humaneval-limit 4 --max-new-tokens 24 --retention-max-new-tokens 16 --eval-batch-size 8 --split val)
python3 bench/quality.py "${small[@]}" --method citi,full --same-data true --jobs 3 --out "$OUT/runs"
python3 bench/quality.py "${small[@]}" --method citi --preset paper --label citi_paper --out "$OUT/runs"
python3 bench/quality_select.py --rule=retention-band "$OUT/runs"
