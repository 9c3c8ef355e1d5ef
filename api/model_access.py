"""Which models a caller may name: the rule job creation, ``GET /v1/models`` and chat completions share.

A model spec is resolved the way the worker will resolve it (the engine's torch-free
:func:`~citi_engine.specs.resolve_model_spec`), then checked against ``CITI_ALLOWED_MODELS`` (else: the
built-in default or a model under ``CITI_MODEL_DIRS``).
"""

from __future__ import annotations

from pathlib import Path

from citi_engine import DEFAULT_MODEL
from citi_service.errors import APIError
from citi_service.settings import Settings


def check_model(spec: str, settings: Settings):
    """Resolve a model spec the way the worker will, and apply CITI_ALLOWED_MODELS; returns the resolved spec."""
    from citi_engine.errors import ModelSpecError
    from citi_engine.specs import BUILTIN_MODELS, resolve_model_spec

    try:
        resolved = resolve_model_spec(spec, model_dirs=settings.model_dirs_list)
    except ModelSpecError as exc:
        raise APIError(400, exc.code, exc.message, param="model") from exc
    allowed = settings.allowed_models_list
    if allowed:
        real = Path(spec).expanduser().resolve() if resolved.kind in ("hf_dir", "gguf") else None
        ok = spec in allowed or (real is not None and any(
            Path(a).expanduser().resolve() == real for a in allowed if a.startswith(("/", ".", "~"))))
        if not ok:
            raise APIError(400, "model_not_allowed",
                           f"model '{spec}' is not allowed on this server; allowed: {', '.join(allowed)}",
                           param="model")
    elif resolved.kind == "hub":
        raise APIError(400, "model_not_allowed",
                       f"hub model '{spec}' is not allowed here: use {', '.join(BUILTIN_MODELS)} or a model under "
                       "CITI_MODEL_DIRS, or ask the operator to list it in CITI_ALLOWED_MODELS", param="model")
    return resolved


def base_model_allowed(spec: str, settings: Settings) -> bool:
    """Whether ``spec`` names a base model callers may use: by the same rule as job creation
    (``CITI_ALLOWED_MODELS``, else the built-in default or a model under ``CITI_MODEL_DIRS``)."""
    try:
        check_model(spec, settings)
    except APIError:
        return False
    return True


def allowed_base_models(settings: Settings) -> list[str]:
    """The base model specs to list: ``CITI_ALLOWED_MODELS``, else the default plus what lies in ``CITI_MODEL_DIRS``
    (each model directory or ``.gguf`` file directly inside one of them)."""
    if settings.allowed_models_list:
        return list(settings.allowed_models_list)
    found = [DEFAULT_MODEL]
    for root in settings.model_dirs_list:
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        for child in sorted(root_path.iterdir()):
            if (child.is_dir() and (child / "config.json").is_file()) or child.suffix == ".gguf":
                found.append(str(child))
    return found


def model_not_found(model: str) -> APIError:
    """OpenAI's answer for a model that does not exist or belongs to someone else (the two look alike)."""
    return APIError(
        404, "model_not_found",
        f"The model '{model}' does not exist or you do not have access to it. GET /v1/models lists the models "
        "your key can use.",
        param="model",
    )
