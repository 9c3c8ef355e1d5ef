#!/usr/bin/env bash
# One GPU lease, several calls of the device tool: each call is given back 30 s after it returns, so a long
# benchmark runs in the background on the held machine and every call waits for it a while, then copies what
# exists into $OUT. The built-in model's GGUF (98 MB) is too big for one call's 64 MiB, so it travels in two
# halves (.m1/, .m2/: `split -b 48M`), one per call, joined on the machine. When the tree has grown so that a half
# and the tree no longer fit one call, split in three and stage twice, .m1 holding gg.aa, then gg.ab; .m2 holds the
# last part. With the service's wheels and Redis (25 MiB) the parts need not be equal: the seventeenth session's
# tree was 19 MiB, so call 1 carried the wheels, Redis and the first 16 MiB (`head -c 16M`, as .m1/gg.aa), call 2 the
# next 40 MiB (`cp .m1b/* ~/stage/` carrying .m1b/gg.ab, an ignored folder) and the start the rest (.m2/gg.ac) with
# .data: two staging calls instead of three. Each call's tree and carried folders stay under 64 MiB.
#   bench/gpu_lease.sh stage          call 1: keep the first half in ~/stage, install the carried wheels (and
#                                     keep the service's wheels and Redis, when carried, in ~/stage/svc)
#   bench/gpu_lease.sh start CMD...   call 2: join the halves, copy the tree to ~/run, start CMD there (GGUF and
#                                     RESULTS in its environment), then wait. NO_GGUF=1: no model, no staging
#                                     call before (the parts that need none, e.g. the 1B serving timings with the
#                                     tokenizer folder carried: CITI_CACHE_DIR=$HOME/run/<folder>)
#   bench/gpu_lease.sh wait           later calls: wait, then copy results
# Waiting ends when RESULTS/DONE exists or after WAIT_S seconds (default 540); results go to $OUT as one tarball.
set -uo pipefail
STAGE=~/stage RUN=~/run RESULTS=~/results
WAIT_S=${WAIT_S:-540}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

collect() {
    local waited=0
    while [ ! -f "$RESULTS/DONE" ] && [ "$waited" -lt "$WAIT_S" ]; do sleep 10; waited=$((waited + 10)); done
    nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv > "$RESULTS/gpu.csv" 2>&1
    tar -czf "$OUT/results.tgz" -C "$RESULTS" --exclude='work' --exclude='artifacts' --exclude='*.jsonl' . 2>/dev/null
    echo "result files: $(find "$RESULTS" -mindepth 2 -maxdepth 3 -name '*.json' | wc -l)," \
        "runs cut or under way with a partial record: $(find "$RESULTS" -mindepth 2 -maxdepth 3 -name '*.json.partial' | wc -l)"
    tail -n 3 "$RESULTS"/*.log 2>/dev/null
}

case "${1:-}" in
stage)
    # whatever this call carries of: the GGUF's first half (.m1), wheels for the engine (.whl), the service's
    # wheels and Redis (.whl-svc, .redis-deb: bench/gpu_service.sh fetch); with the service's folders the halves
    # no longer fit beside them, so stage twice: the service's folders and .whl, then .m1
    mkdir -p "$STAGE"
    if [ -d .m1 ]; then cp .m1/* "$STAGE"/; fi
    if ls .whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$STAGE/site" .whl/*.whl
    fi
    for d in .whl-svc .redis-deb; do
        if [ -d "$d" ]; then mkdir -p "$STAGE/svc" && rm -rf "${STAGE:?}/svc/$d" && cp -r "$d" "$STAGE/svc/"; fi
    done
    nvidia-smi --query-gpu=name,memory.total --format=csv
    ls -la "$STAGE"
    ;;
start)
    shift
    if [ -z "${NO_GGUF:-}" ]; then
        cat "$STAGE"/gg.* .m2/gg.* > "$STAGE/smollm2.gguf"  # the parts in name order, those staged first
        echo "$SHA  $STAGE/smollm2.gguf" | sha256sum -c - || exit 1
    fi
    rm -rf "$RUN" && mkdir -p "$RUN" "$RESULTS" && rm -f "$RESULTS/DONE"
    tar -cf - --exclude=.m1 --exclude=.m2 --exclude=.git . | tar -xf - -C "$RUN"
    # The GPU machine's .git need not be the checkout's (the files are): name the commit in the call, as
    # `CITI_COMMIT=$(git rev-parse --short HEAD)` expanded here, e.g. CITI_COMMIT=27b295b bash bench/gpu_lease.sh start
    if [ -z "${CITI_COMMIT:-}" ]; then
        CITI_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
        [ -z "$(git status --porcelain -- citi_engine bench 2>/dev/null)" ] || CITI_COMMIT="$CITI_COMMIT+dirty"
    fi
    echo "$CITI_COMMIT" > "$RESULTS/commit.txt"
    cd "$RUN" || exit 1
    export PYTHONPATH="$STAGE/site" RESULTS PYTHONUNBUFFERED=1 CITI_COMMIT
    if [ -z "${NO_GGUF:-}" ]; then export GGUF="$STAGE/smollm2.gguf"; fi
    setsid nohup "$@" > "$RESULTS/driver.log" 2>&1 < /dev/null &
    sleep 5
    collect
    ;;
wait)
    collect
    ;;
*)
    echo "usage: bench/gpu_lease.sh stage | start CMD... | wait" >&2; exit 2
    ;;
esac
