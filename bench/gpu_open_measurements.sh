#!/usr/bin/env bash
# What the open issues still need measured on one GPU, in one lease: run it through bench/gpu_lease.sh (stage,
# then `start bash bench/gpu_open_measurements.sh`; GGUF and RESULTS come from there). Each part writes its own
# files under RESULTS as soon as they exist and has a time limit, so a lease that ends early still returns what
# was measured. PARTS (a comma list, default fused,jobspeed,compile) picks what a lease runs, in the order
# quality, service, fused, jobprofile, jobspeed, timings, serving1b, adapteralign, onerow, compile, micro. What the
# open issues still need (the eighteenth session got no machine): `fused` (the served adapter's delta in one Triton
# kernel, off by default until this times it), `jobspeed` (the job's training time against 182.91 s after the
# routing terms went to all layers at once), `jobprofile` (its launches a step against 13,900-15,700), `compile`,
# `onerow`, `micro`:
#   quality   method issue: bench/quality_gpu_calibrated.sh with PLAN (PLAN_LARGE instead on a card over 120 GB,
#             when set; pool limit QUALITY_S, default 1380 s) (default bench/plans/router_val3.txt: the router's
#             third round, run in the fourteenth session in 19 minutes at JOBS=5 on an 80 GB card, one of the
#             nine runs cut by the time limit; five at a time ran out of memory once); runs in
#             RESULTS/quality/<plan>/
#   fused     performance issue's adapter cost: bench/fused_check.py (one component's delta in one Triton kernel
#             against the four, error and GPU time per shape), then bench/inference.py --decode cuda_graphs on
#             SmolLM2 and on the 1B shape with a job's adapter, --fused-delta off then on; about 6 minutes
#   jobprofile  performance and GPU host issues: a SmolLM2 CITI job's steps (bench/quality.py, 40 steps, a few test
#             cases) profiled through CITI_PROFILE_DIR into RESULTS/jobprofile/<stage>.profile.{txt,json}; about 3 minutes
#   jobspeed  performance issue: the default SmolLM2 CITI job's train_seconds, unprofiled (bench/quality.py as the
#             GPU host run's comparison step runs it: 182.91 s on an H100 before the routing terms were stacked);
#             about 4 minutes
#   timings   performance issue, alone on the card (about 4 minutes): bench/inference.py --decode cuda_graphs on
#             SmolLM2 with the adapter on a job's share of components (MOLoRA on half) and on a fifth (the earlier
#             runs'), then 8B LoRA against CITI stage 2, packed
#   serving1b performance issue's serving target on the 1B shape (random weights, SmolLM2's tokenizer), about 6
#             to 12 minutes: bench/serving_step.py (one decode step's GPU and host time and kernels at 1 and 16
#             rows; then with the step compiled), bench/inference.py with CUDA graphs and grouped decode attention,
#             the same with transformers' sdpa attention (before), with the step compiled (compiled_graphs), then the
#             dynamic cache, one after the other (<= 4 ms/token at batch 1, >= 4x the issue's aggregate at 16
#             concurrent, adapter <= 1.15x)
#   adapteralign  performance issue's adapter cost at 16 rows: bench/router_matmul.py (the served adapter's
#             router-and-A matmul by layout), then bench/serving_step.py unaligned and aligned, and
#             bench/inference.py (cuda_graphs, compiled_graphs) on the 1B shape with that weight's rows padded to
#             64 (--router-align 64, the default since the fourteenth session, which ran it); about 5 minutes, no
#             GGUF needed; only on request
#   onerow    performance issue's compiled adapter at batch 1 (+19% in the fourteenth session): bench/serving_step.py
#             --compiled --rows 1 with the adapter as matmuls, then as reductions (--one-row-reductions:
#             citi_engine.molora.layer.ONE_ROW_REDUCTIONS), then bench/inference.py compiled_graphs with them; 1B
#             shape, no GGUF needed, about 8 minutes
#   compile   8B stage 2 with torch.compile on the RMSNorms and on whole layers, then with 8,192 tokens a
#             micro-batch without and with the layers compiled (MFU goal 0.5); about 10 minutes
#   micro     performance issue's layer target (MOLoRA <= 1.10x a LoRA of rank 32): the 8B micro-benchmark again,
#             each layer the median of 7 rounds (the fifth session's single stretch per way was as noisy as the
#             effect), eager and under torch.compile, with the profiler's kernel tables; a few minutes, alone
#             on the card; only on request
#   service   GPU host issue: bench/gpu_service.sh run, full-size job, every step (needs .whl-svc and .redis-deb
#             staged in ~/stage/svc; about 26 minutes: a lease of its own, PARTS=service; run in the fifteenth
#             session but for the last step, which SERVICE_ARGS="--steps job,compare" ran in the seventeenth, in
#             about 12 minutes)
# Measured already and not run again: generation memory, the dynamic KV cache's timings, stage 2 with and
# without soft targets, constrained decoding, CITI and the baselines at their own threshold, negatives_near and
# the router settings on the validation side, the shipped defaults on test at each job's threshold
# (bench/plans/method_next.txt, twelfth session), their retention on 120 probes and the 1B serving shape with
# grouped attention and the compiled step (thirteenth session), the router's third round and the adapter's
# router rows padded (fourteenth session) (bench/results/).
# Calls (each within 30 s of the last): `bash bench/gpu_lease.sh stage` carrying .whl and .m1 (and, for the
# service, first a call carrying .whl-svc .redis-deb); since the tree passed 14 MB the GGUF goes in three parts
# (`split -n 3`: stage .m1 holding gg.aa with .whl, then .m1 holding gg.ab, and .m2 holding gg.ac at the start);
# `PARTS=... CITI_COMMIT=<short hash> WAIT_S=540 bash bench/gpu_lease.sh start bash bench/gpu_open_measurements.sh`
# carrying .m2 .data; then `WAIT_S=550 bash
# bench/gpu_lease.sh wait` until DONE or the GPU time is spent.
# The 1B serving timings and the micro-benchmark need no GGUF: when machines are scarce, one call carrying only
# SmolLM2's tokenizer folder does them (the eleventh session's, about 2.5 minutes in all): copy
# ~/.cache/citi/smollm2-tokenizer into an ignored folder (.m2tok/), carry it, and start the parts in the background:
#   NO_GGUF=1 CITI_CACHE_DIR=$HOME/run/.m2tok CITI_COMMIT=<short hash> PARTS=serving1b WAIT_S=540 \
#       bash bench/gpu_lease.sh start bash bench/gpu_open_measurements.sh
# then `WAIT_S=540 bash bench/gpu_lease.sh wait` (without GGUF the 1B runs take the tokenizer from CITI_CACHE_DIR;
# bench/serving_step.py needs none at all).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${RESULTS:?}"
needs_gguf() { [ -n "${GGUF:-}" ] || { echo "part $1 needs GGUF (the built-in model): skipped" >> "$RESULTS/parts.log"; false; }; }
mkdir -p "$RESULTS"
part() { echo "$(date -u +%H:%M:%S) $*" >> "$RESULTS/parts.log"; }
PARTS=",${PARTS:-fused,jobspeed,compile},"
want() { [[ "$PARTS" == *",$1,"* ]]; }

if want quality && needs_gguf quality; then
    # PLAN_LARGE, when set, replaces PLAN on a card of more than 120 GB (eight runs at a time there, five on 80 GB);
    # QUALITY_S limits the pool (default 1380 s: one wave of five takes about 14 minutes, two waves 23).
    mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
    if [ -n "${PLAN_LARGE:-}" ] && [ "${mem_mib:-0}" -gt 120000 ]; then PLAN=$PLAN_LARGE; fi
    part "quality (PLAN ${PLAN:=bench/plans/router_val3.txt}, limit ${QUALITY_S:=1380} s)"
    PLAN=$PLAN timeout "$QUALITY_S" bash bench/quality_gpu_calibrated.sh "$GGUF" "$RESULTS/quality"
    pkill -f bench/quality.py; sleep 5  # runs the time limit cut must not share the card with what follows
fi
if want service && needs_gguf service && [ -d ~/stage/svc/.whl-svc ]; then
    part "gpu_service"
    cp -r ~/stage/svc/.whl-svc ~/stage/svc/.redis-deb .
    # SERVICE_ARGS: more arguments of bench/gpu_service.py, e.g. "--steps job,compare" (the main job and the
    # comparison with bench/quality.py only: about 12 minutes)
    timeout 1800 bash bench/gpu_service.sh run "$GGUF" "$RESULTS/gpu_service" ${SERVICE_ARGS:-} > "$RESULTS/gpu_service.log" 2>&1
fi
if want fused; then
    # The adapter's delta in one Triton kernel (citi_engine/molora/fused.py): each component shape's error and GPU
    # time against the four kernels (a minute), then SmolLM2 served with CUDA graphs and a job's adapter (MOLoRA on
    # half) with the four kernels and then fused, one process after the other (+34.7% / +39.7% a token at 1 / 16
    # concurrent with the four, seventeenth session)
    part "fused adapter delta: per component"
    timeout 240 python3 bench/fused_check.py --out "$RESULTS/fused_check" > "$RESULTS/fused_check.log" 2>&1
    # SmolLM2 (with the GGUF), then the 1B shape (its tokenizer from the GGUF or, with NO_GGUF=1, from CITI_CACHE_DIR)
    for model in ${GGUF:+smollm2} 1b; do
        args=(--shape 1b ${GGUF:+--tokenizer-gguf "$GGUF"}) && [ "$model" = smollm2 ] && args=(--gguf "$GGUF")
        for way in off on; do
            part "inference $model cuda_graphs, molora fraction 0.5, fused delta $way"
            timeout 360 python3 bench/inference.py "${args[@]}" --rounds 4 --decode cuda_graphs --fused-delta "$way" \
                --out "$RESULTS/inference" > "$RESULTS/inference_${model}_cuda_graphs_fused_$way.log" 2>&1
        done
    done
fi
if want jobprofile && needs_gguf jobprofile; then
    # A SmolLM2 CITI job's own training steps under the torch profiler (CITI_PROFILE_DIR,
    # citi_engine/training/profiling.py): in the fifteenth session's service run on an H100 every stage trained about
    # 14k tokens/s, 0.47 s a step of about 6.6k tokens, far slower than the model's compute; the profile says whether
    # a step waits on the host (wall time per step against the kernels' busy time and launches). About 3 minutes.
    part "job profile"
    CITI_PROFILE_DIR="$RESULTS/jobprofile" timeout 480 python3 bench/quality.py --model "$GGUF" --method citi \
        --seed 0 --split test --max-steps 40 --limit-test 4 --probe-limit 2 --no-humaneval --force \
        --out "$RESULTS/jobprofile/quality" > "$RESULTS/jobprofile.log" 2>&1
fi
if want jobspeed && needs_gguf jobspeed; then
    # The whole default SmolLM2 CITI job's training time, unprofiled, exactly as bench/gpu_service.py's comparison
    # step runs bench/quality.py: 182.91 s of train_seconds on an H100 at dad981e (seventeenth session,
    # bench/results/gpu_service_raw/h100_s17/quality_compare/), before the routing terms went to all layers at once.
    # About 4 minutes.
    part "job speed"
    timeout 480 python3 bench/quality.py --model "$GGUF" --method citi --seed 0 --split test --data .data/bfcl \
        --limit-test 4 --probe-limit 2 --no-humaneval --force --decode auto --out "$RESULTS/jobspeed" \
        > "$RESULTS/jobspeed.log" 2>&1
fi
if want timings && needs_gguf timings; then
    # The short timings after the pool, alone on the card.
    # SmolLM2 with CUDA graphs, the adapter on a job's share of components (MOLoRA on half: 105 of 210, the
    # fifteenth session's HTTP run showed +40% a token for such an adapter) and on a fifth (the earlier rows'),
    # then the first with the components that read one input sharing their router-and-A matmul
    for way in "0.5" "0.2" "0.5 --shared-input-groups"; do
        set -- $way
        part "inference cuda_graphs, molora fraction $*"
        timeout 360 python3 bench/inference.py --gguf "$GGUF" --rounds 4 --decode cuda_graphs \
            --molora-fraction "$@" --out "$RESULTS/inference" > "$RESULTS/inference_cuda_graphs_${1}${2:+_groups}.log" 2>&1
    done
    part "throughput 8b lora and citi stage 2, packed"
    for method in lora citi_stage2; do
        timeout 300 python3 bench/throughput.py --shape 8b --method "$method" --packing true --out "$RESULTS/throughput" \
            > "$RESULTS/throughput_$method.log" 2>&1
    done
fi
if want serving1b; then
    # One decode step taken apart first (GPU time, host time, kernels at 1 and 16 rows; about a minute)
    part "serving step 1b"
    timeout 240 python3 bench/serving_step.py --shape 1b --profile --out "$RESULTS/serving_step" \
        > "$RESULTS/serving_step.log" 2>&1
    part "serving step 1b, compiled"
    timeout 420 python3 bench/serving_step.py --shape 1b --compiled --out "$RESULTS/serving_step_compiled" \
        > "$RESULTS/serving_step_compiled.log" 2>&1
    # CUDA graphs with grouped decode attention (the server's), then with transformers' sdpa (keys and values
    # copied per query head: the attention before), then the dynamic cache: one process after the other
    for way in "cuda_graphs grouped" "cuda_graphs sdpa" "compiled_graphs grouped" "dynamic sdpa"; do
        set -- $way
        part "inference 1b $1, attention $2"
        timeout 480 python3 bench/inference.py --shape 1b ${GGUF:+--tokenizer-gguf "$GGUF"} --rounds 4 --decode "$1" \
            --attention "$2" --out "$RESULTS/inference" > "$RESULTS/inference_1b_$1_$2.log" 2>&1
    done
fi
if want adapteralign; then
    # The adapter's router-and-A matmul by layout alone, then the 1B step and serving with its rows padded to 64
    part "router matmul layouts"
    timeout 180 python3 bench/router_matmul.py --out "$RESULTS/router_matmul" > "$RESULTS/router_matmul.log" 2>&1
    # the step unaligned in the same lease first, so the step's comparison holds on whichever card came
    part "serving step 1b, router rows unaligned"
    timeout 240 python3 bench/serving_step.py --shape 1b --router-align 1 --profile \
        --out "$RESULTS/serving_step_align1" > "$RESULTS/serving_step_align1.log" 2>&1
    part "serving step 1b, router rows aligned to 64"
    timeout 240 python3 bench/serving_step.py --shape 1b --router-align 64 --profile \
        --out "$RESULTS/serving_step_align64" > "$RESULTS/serving_step_align64.log" 2>&1
    for decode in cuda_graphs compiled_graphs; do
        part "inference 1b $decode, router rows aligned to 64"
        timeout 480 python3 bench/inference.py --shape 1b ${GGUF:+--tokenizer-gguf "$GGUF"} --rounds 4 \
            --decode "$decode" --router-align 64 --out "$RESULTS/inference" > "$RESULTS/inference_1b_${decode}_align64.log" 2>&1
    done
fi
if want onerow; then
    # The compiled step at one row, the adapter as matmuls and then as reductions, one after the other; then the
    # serving loop with the reductions (the fourteenth session's compiled_graphs run is the one without)
    for flag in "" "--one-row-reductions"; do
        part "serving step 1b compiled, one row ${flag:-(matmuls)}"
        timeout 300 python3 bench/serving_step.py --shape 1b --compiled --rows 1 $flag \
            --out "$RESULTS/serving_step_onerow${flag:+_reductions}" > "$RESULTS/serving_step_onerow${flag:+_reductions}.log" 2>&1
    done
    part "inference 1b compiled_graphs, one-row adapter as reductions"
    timeout 480 python3 bench/inference.py --shape 1b ${GGUF:+--tokenizer-gguf "$GGUF"} --rounds 4 \
        --decode compiled_graphs --one-row-reductions --out "$RESULTS/inference" > "$RESULTS/inference_1b_onerow.log" 2>&1
fi
if want compile; then
    part "throughput 8b citi stage 2 with torch.compile (norms, then whole layers)"
    for mode in norms layers; do
        timeout 300 python3 bench/throughput.py --shape 8b --method citi_stage2 --packing true --compile "$mode" \
            --variant "compile_$mode" --out "$RESULTS/throughput" > "$RESULTS/throughput_compile_$mode.log" 2>&1
    done
    # and the benchmark's 4,096 tokens a micro-batch doubled (the service packs rows of up to 32,768 tokens; at
    # 4,096 an 8B step is 0.32 s, short enough for fixed costs to show), without and with the layers compiled
    part "throughput 8b citi stage 2, 8,192 tokens a micro-batch"
    for mode in off layers; do
        timeout 300 python3 bench/throughput.py --shape 8b --method citi_stage2 --packing true --tokens 8192 \
            --compile "$mode" --variant "tokens8k_compile_$mode" --out "$RESULTS/throughput" \
            > "$RESULTS/throughput_tokens8k_compile_$mode.log" 2>&1
    done
fi
if want micro; then
    # Eager with kernel tables first (a minute or two), then again with the compiled ways (fourteen compilations)
    # into a folder of its own, so a time limit that cuts the second keeps the first.
    part "throughput 8b micro: MOLoRA against LoRA r=32 per layer, eager, with kernel tables"
    timeout 240 python3 bench/throughput.py --micro --shape 8b --out "$RESULTS/throughput" \
        --profile "$RESULTS/throughput" --profile-steps 10 > "$RESULTS/throughput_micro.log" 2>&1
    part "throughput 8b micro, eager and compiled"
    timeout 480 python3 bench/throughput.py --micro --micro-compile --shape 8b --out "$RESULTS/throughput_compiled" \
        > "$RESULTS/throughput_micro_compiled.log" 2>&1
fi
part "done"
touch "$RESULTS/DONE"
