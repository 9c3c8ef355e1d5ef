#!/usr/bin/env bash
# The whole service on a GPU host without Docker (the GPU host issue): Redis from Debian's package unpacked into a
# folder of its own, the API's and worker's Python packages as wheels, then bench/gpu_service.py (API, worker,
# inference server, a CITI job over HTTP, chat, queue, kill -9, latency). Ends by itself.
#
#   bench/gpu_service.sh fetch                 here (PyPI and Debian reachable): wheels for the GPU host's Python
#                                              (cp312) into .whl-svc/, Redis's .debs into .redis-deb/ (~25 MB)
#   bench/gpu_service.sh run GGUF OUT [ARGS]   on the GPU host (the two folders carried): install, start, measure;
#                                              ARGS go to bench/gpu_service.py
#   bench/gpu_service.sh cpu-check OUT         here: the same steps on CPU with a tiny model and a few steps
#
# The GPU host has torch, transformers, peft, numpy and their kin; only what the API and worker add is carried
# (docker/requirements-worker.txt less the packages listed in HOST_HAS).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
PYVER=${PYVER:-3.12}
HOST_HAS='^(torch|transformers|peft|accelerate|numpy|safetensors|tokenizers|huggingface_hub|hf-xet|filelock|fsspec|Jinja2|MarkupSafe|networkx|sympy|mpmath|regex|requests|urllib3|charset-normalizer|certifi|idna|tqdm|PyYAML|packaging|psutil|matplotlib|contourpy|cycler|fonttools|kiwisolver|pillow|pyparsing|setuptools|typing_extensions|six|python-dateutil|boto3|botocore|s3transfer|jmespath)=='

redis_env() {
    export PATH="$PWD/.redis-root/usr/bin:$PATH"
    export LD_LIBRARY_PATH="$PWD/.redis-root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

case "${1:-}" in
fetch)
    rm -rf .whl-svc .redis-deb && mkdir -p .whl-svc .redis-deb
    grep -vE '^(#|$)' docker/requirements-worker.txt | grep -vE "$HOST_HAS" > .whl-svc/requirements.txt
    echo "openai==$(.venv/bin/python -c 'import openai; print(openai.__version__)')" >> .whl-svc/requirements.txt
    for dep in jiter sniffio; do
        echo "$dep==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$dep'))")" >> .whl-svc/requirements.txt
    done
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl-svc -r .whl-svc/requirements.txt
    (cd .redis-deb && apt-get download redis-server redis-tools libjemalloc2 liblzf1 >/dev/null)
    du -sh .whl-svc .redis-deb
    ;;
run)
    GGUF=$2; OUT=$3; shift 3
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/svc-site .whl-svc/*.whl
    export PYTHONPATH="/tmp/svc-site${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p .redis-root && for deb in .redis-deb/*.deb; do dpkg -x "$deb" .redis-root; done
    redis_env
    redis-server --version
    mkdir -p "$OUT"
    python3 bench/gpu_service.py --model "$GGUF" --out "$OUT" "$@"
    ;;
cpu-check)
    OUT=$2
    mkdir -p "$OUT"
    .venv/bin/python - "$OUT/tiny" <<'PY'
import sys
from transformers import AutoModelForCausalLM
from citi_engine.testing import make_tiny_model_dir, vary_weights
path = make_tiny_model_dir(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(path)
vary_weights(model)  # wide enough to write text: the replay needs non-empty answers
model.save_pretrained(path)
PY
    .venv/bin/python bench/gpu_service.py --model "$OUT/tiny" --out "$OUT/run" --limit-train 40 --limit-test 6 \
        --max-steps 6 --small-steps 8 --chat-requests 4 --chat-concurrency 2 --latency-rounds 1 --latency-tokens 8 \
        --hyperparameters '{"batch_size": 4, "importance_examples": 8, "importance_batch_size": 4, "eval_examples": 4,
                            "eval_probes": 2, "eval_humaneval": 1, "replay_examples": 8, "replay_max_new_tokens": 16,
                            "eval_max_new_tokens": 32}'
    ;;
*)
    echo "usage: bench/gpu_service.sh fetch | run GGUF OUT [ARGS] | cpu-check OUT" >&2
    exit 2
    ;;
esac
