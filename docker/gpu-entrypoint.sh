#!/usr/bin/env bash
# Entry point of the GPU containers (worker and inference): picks this container's GPUs, then
# runs the command.
#
# Docker cannot give the replicas of one scaled service different GPUs: a reservation of
# `count: 1` is GPU 0 in every replica. So every GPU container is given all the host's GPUs
# and, with CITI_CLAIM_GPUS=N, claims N of them that no other container of this host holds,
# then runs with CUDA_VISIBLE_DEVICES set to those. A claim is an flock on one file per GPU
# (named by the GPU's UUID) in a volume that every GPU container of the host mounts; the kernel
# drops the lock when the process dies, so a crashed or stopped container frees its GPUs with
# nothing to clean up. `docker compose up --scale worker=8` with CITI_GPUS_PER_WORKER=1 thus
# runs eight workers on eight different GPUs.
#
# CITI_CLAIM_GPUS unset, empty or "all": no claim, the command sees every GPU it was given.
# CITI_GPU_LOCK_DIR (default /run/citi-gpu-locks): where the lock files live.
# CITI_CLAIM_RETRY_SECONDS (default 10): how long to wait before trying again when too few GPUs
# are free (a surplus replica waits until another one stops).
set -euo pipefail

want="${CITI_CLAIM_GPUS:-all}"
lock_dir="${CITI_GPU_LOCK_DIR:-/run/citi-gpu-locks}"
retry_s="${CITI_CLAIM_RETRY_SECONDS:-10}"

if [[ $# -eq 0 ]]; then
    echo "citi-gpu-entrypoint: no command given" >&2
    exit 2
fi
if [[ -z "$want" || "$want" == "all" ]]; then
    exec "$@"
fi
if ! [[ "$want" =~ ^[1-9][0-9]*$ ]]; then
    echo "citi-gpu-entrypoint: CITI_CLAIM_GPUS must be a positive whole number or 'all', not '$want'" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "citi-gpu-entrypoint: CITI_CLAIM_GPUS=$want but this container sees no GPU (no nvidia-smi)." \
        "Install the NVIDIA Container Toolkit on the host, or unset CITI_CLAIM_GPUS to run without claiming." >&2
    exit 2
fi

mapfile -t uuids < <(nvidia-smi --query-gpu=uuid --format=csv,noheader | tr -d ' ')
if ((${#uuids[@]} < want)); then
    echo "citi-gpu-entrypoint: CITI_CLAIM_GPUS=$want but this container sees only ${#uuids[@]} GPU(s);" \
        "lower CITI_GPUS_PER_WORKER / CITI_GPUS_PER_INFERENCE in .env" >&2
    exit 2
fi
mkdir -p "$lock_dir"

while true; do
    claimed=()
    fds=()
    for uuid in "${uuids[@]}"; do
        exec {fd}>>"$lock_dir/$uuid.lock"
        if flock --nonblock "$fd"; then
            claimed+=("$uuid")
            fds+=("$fd")
            ((${#claimed[@]} == want)) && break
        else
            exec {fd}>&-
        fi
    done
    ((${#claimed[@]} == want)) && break
    # Give back a partial claim before waiting, so two half-served containers never hold each
    # other's GPUs forever.
    for fd in "${fds[@]}"; do
        exec {fd}>&-
    done
    echo "citi-gpu-entrypoint: ${#claimed[@]} of ${#uuids[@]} GPU(s) free, need $want; retrying in ${retry_s}s" >&2
    sleep "$retry_s"
done

# The lock descriptors stay open across exec: the command holds its GPUs for as long as it runs.
CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${claimed[*]}")"
export CUDA_VISIBLE_DEVICES
echo "citi-gpu-entrypoint: claimed GPU(s) $CUDA_VISIBLE_DEVICES" >&2
exec "$@"
