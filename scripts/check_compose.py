"""Structural checks of the deployment files that `docker compose config` cannot make.

`docker compose config` (make compose-check) proves docker-compose.yml is valid Compose; this
script checks that it is *our* deployment: the services the README promises, each with its
healthcheck, GPU reservation, shared volumes and profile, and that no secret is baked into the
compose file or an image. Exit status 1 with one line per problem, 0 when all hold.

Usage: python scripts/check_compose.py [--root DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# A compose interpolation of the whole value: ${NAME}, ${NAME:-default}, ${NAME:?message}, ...
INTERPOLATION = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>.*)\}$", re.DOTALL)
SHARED_ARTIFACTS = ("api", "worker", "inference")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _volume_sources(service: dict[str, Any]) -> dict[str, str]:
    """target -> source for every volume of a service (short or long syntax)."""
    out = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2:
                out[parts[1]] = parts[0]
        else:
            out[str(vol.get("target"))] = str(vol.get("source"))
    return out


def _command(service: dict[str, Any]) -> str:
    cmd = service.get("command") or ""
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def _healthcheck(name: str, service: dict[str, Any]) -> list[str]:
    check = service.get("healthcheck") or {}
    if check.get("disable") or not check.get("test"):
        return [f"{name}: no healthcheck"]
    return []


def _depends_healthy(service: dict[str, Any], on: str) -> bool:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return False
    return (deps.get(on) or {}).get("condition") == "service_healthy"


def _gpu_reservation(service: dict[str, Any]) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return any(
        d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) and ("count" in d or "device_ids" in d)
        for d in devices
    )


def check_secrets(compose: dict[str, Any]) -> list[str]:
    """Problems where a secret-looking variable has a literal value in the compose file.

    A secret must come from the environment or .env: an interpolation, never a value. The API
    keys may not even have a default (``${CITI_API_KEYS:?...}`` makes a missing one an error).
    """
    problems = []
    for name, service in (compose.get("services") or {}).items():
        for var, value in _env(service).items():
            if not SECRET_NAME.search(var) or value == "":
                continue
            match = INTERPOLATION.match(value)
            if match is None:
                problems.append(f"{name}: {var} has a literal value in docker-compose.yml; take it from .env")
            elif var == "CITI_API_KEYS" and match.group("op") not in (":?", "?", None):
                problems.append(f"{name}: CITI_API_KEYS must have no default (use ${{CITI_API_KEYS:?...}})")
        build = service.get("build") if isinstance(service.get("build"), dict) else {}
        for arg in build.get("args") or {}:
            if SECRET_NAME.search(str(arg)):
                problems.append(f"{name}: build argument {arg} would bake a secret into the image")
    return problems


def check_compose(compose: dict[str, Any]) -> list[str]:
    """Every way ``compose`` (docker-compose.yml, parsed) falls short of the deployment we promise."""
    problems: list[str] = []
    services = compose.get("services") or {}
    volumes = compose.get("volumes") or {}
    for needed in ("redis", "api", "worker", "inference"):
        if needed not in services:
            problems.append(f"missing service '{needed}'")
    if problems:
        return problems

    redis, api, worker, inference = (services[n] for n in ("redis", "api", "worker", "inference"))
    redis_cmd = _command(redis)
    if not re.search(r"--appendonly\s+yes", redis_cmd):
        problems.append("redis: append-only persistence is off (command needs --appendonly yes)")
    data_source = _volume_sources(redis).get("/data")
    if data_source not in volumes:
        problems.append("redis: /data is not on a named volume")
    problems += _healthcheck("redis", redis)

    ports = [str(p) for p in api.get("ports") or []]
    if not any(p.endswith(":8000") or p == "8000" for p in ports):
        problems.append("api: port 8000 is not published")
    problems += _healthcheck("api", api)
    if not _depends_healthy(api, "redis"):
        problems.append("api: does not wait for redis to be healthy")
    if "api.main:app" not in _command(api) and "command" in api:
        problems.append("api: command does not serve api.main:app")

    if "worker.celery_app" not in _command(worker):
        problems.append("worker: command does not run the Celery worker (worker.celery_app)")
    if not _gpu_reservation(worker):
        problems.append("worker: no GPU reservation in deploy.resources.reservations.devices")
    if "container_name" in worker:
        problems.append("worker: container_name prevents `docker compose up --scale worker=N`")
    if worker.get("ports"):
        problems.append("worker: published ports prevent scaling")
    if not _depends_healthy(worker, "redis"):
        problems.append("worker: does not wait for redis to be healthy")
    problems += _healthcheck("worker", worker)
    if not any("hf-cache" in target or "huggingface" in target for target in _volume_sources(worker)):
        problems.append("worker: no model cache volume")

    if "worker.inference.app:app" not in _command(inference):
        problems.append("inference: command does not serve worker.inference.app:app")
    if not _gpu_reservation(inference):
        problems.append("inference: no GPU reservation")
    problems += _healthcheck("inference", inference)

    artifact_sources = {name: _volume_sources(services[name]).get("/data/artifacts") for name in SHARED_ARTIFACTS}
    if len(set(artifact_sources.values())) != 1 or next(iter(artifact_sources.values())) not in volumes:
        problems.append(f"artifacts are not one named volume at /data/artifacts in {', '.join(SHARED_ARTIFACTS)}: "
                        f"{artifact_sources}")
    for name in SHARED_ARTIFACTS:
        if _env(services[name]).get("CITI_ARTIFACT_DIR", "/data/artifacts") != "/data/artifacts":
            problems.append(f"{name}: CITI_ARTIFACT_DIR does not point at the shared volume")

    s3_services = [n for n, s in services.items() if "s3" in (s.get("profiles") or [])]
    if not s3_services:
        problems.append("no service in the 's3' profile (an S3-compatible server)")
    for name, service in services.items():
        if name in ("redis", "api", "worker", "inference") and service.get("profiles"):
            problems.append(f"{name}: a core service must not sit in a profile")
    return problems + check_secrets(compose)


def check_dockerfile(text: str, name: str) -> list[str]:
    """Problems in one Dockerfile: secrets in ENV/ARG, a copied .env, running as root."""
    problems = []
    lines = re.sub(r"\\\n", " ", text).splitlines()
    users = []
    stages: set[str] = set()
    for line in lines:
        words = line.strip().split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op in ("ENV", "ARG"):
            for word in words[1:]:
                var = word.split("=", 1)[0]
                if SECRET_NAME.search(var) and not var.startswith(("TORCH_",)):
                    problems.append(f"{name}: {op} {var} bakes a secret-looking variable into the image")
        if op in ("COPY", "ADD") and any(re.search(r"(^|/)\.env(\.|$)", w) for w in words[1:]):
            problems.append(f"{name}: copies a .env file into the image")
        if op == "FROM":
            image = words[1]
            if len(words) >= 4 and words[2].upper() == "AS":
                stages.add(words[3])
            if image in stages:
                pass  # a previous stage of this file, pinned where it was defined
            elif ":" not in image.split("/")[-1] or image.endswith(":latest"):
                problems.append(f"{name}: base image '{image}' is not pinned to a version tag")
            users.append("root")  # each stage starts as root
        if op == "USER":
            users[-1:] = [words[1]]
    if users and users[-1] in ("root", "0", "0:0"):
        problems.append(f"{name}: the final image runs as root (add a USER)")
    return problems


def check_dockerignore(text: str) -> list[str]:
    """The build context must not carry .env files or the virtual environment."""
    patterns = [p.strip() for p in text.splitlines() if p.strip() and not p.startswith("#")]
    problems = []
    excludes_all = "*" in patterns
    for needed in (".env", ".venv"):
        allowed_back = any(p.lstrip("!").rstrip("/") == needed for p in patterns if p.startswith("!"))
        if allowed_back or not (excludes_all or needed in patterns or f"**/{needed}" in patterns):
            problems.append(f".dockerignore: {needed} is not excluded from the build context")
    return problems


def check_all(root: Path = ROOT) -> list[str]:
    """All checks on the files under ``root``."""
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    problems = check_compose(compose)
    for dockerfile in sorted((root / "docker").glob("*.Dockerfile")):
        problems += check_dockerfile(dockerfile.read_text(), f"docker/{dockerfile.name}")
    ignore = root / ".dockerignore"
    problems += check_dockerignore(ignore.read_text()) if ignore.exists() else [".dockerignore is missing"]
    return problems


def main() -> int:
    """Print the problems found; exit status 1 when there are any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args()
    problems = check_all(args.root)
    for problem in problems:
        print(f"check_compose: {problem}")
    if not problems:
        print("check_compose: docker-compose.yml, Dockerfiles and .dockerignore: all structural checks hold")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
