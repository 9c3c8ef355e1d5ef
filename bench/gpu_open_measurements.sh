#!/usr/bin/env bash
# What the open issues still need measured on one GPU, in the order the issues rank, in one lease: run it
# through bench/gpu_lease.sh (stage, then `start bash bench/gpu_open_measurements.sh`; GGUF and RESULTS come
# from there). Each part writes its own files under RESULTS as soon as they exist and has a time limit, so a
# lease that ends early still returns what was measured.
#   1. method issue and OpenAI compatibility: bench/quality_gpu_calibrated.sh (the call threshold chosen on
#      validation, on test and on the live irrelevance set, for CITI's 3 seeds and the baselines; function
#      masking on test; free against constrained decoding)
#   2. alone on the card, timings: bench/inference.py (runtime against plain transformers generate; the dynamic
#      KV cache, then static with CUDA graphs) and
#      bench/throughput.py --micro on the 8B shape (router and A in one matmul against two) with the profiler;
#      generation memory (bench/gen_memory.py, prompts 512 / 2,048 / 4,096 at batch 64, whole prompts in one
#      prefill against chunked prefill, replies compared token for token); 8B stage 2 packed with and without
#      the soft targets' teacher pass
#   3. the GPU host issue: bench/gpu_service.sh run, full-size job, every step (needs .whl-svc and .redis-deb
#      staged in ~/stage/svc; skipped without them)
# Calls (each within 30 s of the last): `bash bench/gpu_lease.sh stage` carrying .whl .whl-svc .redis-deb; the
# same carrying .m1; `WAIT_S=540 bash bench/gpu_lease.sh start bash bench/gpu_open_measurements.sh` carrying .m2
# .data; then `WAIT_S=550 bash bench/gpu_lease.sh wait` until DONE or the GPU time is spent.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${GGUF:?}" "${RESULTS:?}"
mkdir -p "$RESULTS"
part() { echo "$(date -u +%H:%M:%S) $*" >> "$RESULTS/parts.log"; }

part "quality (call threshold, masking, constrained)"
timeout 1260 bash bench/quality_gpu_calibrated.sh "$GGUF" "$RESULTS/quality"
pkill -f bench/quality.py; sleep 5  # runs the time limit cut must not share the card with the timings below
for decode in dynamic cuda_graphs; do
    part "inference $decode"
    timeout 360 python3 bench/inference.py --gguf "$GGUF" --rounds 4 --decode "$decode" --out "$RESULTS/inference" \
        > "$RESULTS/inference_$decode.log" 2>&1
done
part "throughput micro"
timeout 300 python3 bench/throughput.py --micro --shape 8b --out "$RESULTS/throughput" \
    --profile "$RESULTS/throughput/profile" > "$RESULTS/throughput.log" 2>&1
part "gen_memory"
timeout 300 python3 bench/gen_memory.py --gguf "$GGUF" --out "$RESULTS/gen_memory" > "$RESULTS/gen_memory.log" 2>&1
part "throughput stage 2, with and without soft targets"
timeout 300 python3 bench/throughput.py --shape 8b --method citi_stage2 --packing true --out "$RESULTS/throughput" \
    --profile "$RESULTS/throughput/profile" > "$RESULTS/throughput_stage2.log" 2>&1
timeout 300 python3 bench/throughput.py --shape 8b --method citi_stage2 --packing true --loss soft --variant soft \
    --out "$RESULTS/throughput" > "$RESULTS/throughput_stage2_soft.log" 2>&1
if [ -d ~/stage/svc/.whl-svc ]; then
    part "gpu_service"
    cp -r ~/stage/svc/.whl-svc ~/stage/svc/.redis-deb .
    timeout 1800 bash bench/gpu_service.sh run "$GGUF" "$RESULTS/gpu_service" > "$RESULTS/gpu_service.log" 2>&1
fi
part "done"
touch "$RESULTS/DONE"
