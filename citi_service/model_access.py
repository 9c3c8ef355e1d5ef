"""Which base models callers may name: the one rule the API (job creation, ``GET /v1/models``, chat) and the
inference server both apply.

A model spec is resolved the way the worker will resolve it (the engine's torch-free
:func:`~citi_engine.specs.resolve_model_spec`), then checked against ``CITI_ALLOWED_MODELS`` (else: the
built-in default or a model under ``CITI_MODEL_DIRS``).
"""

from __future__ import annotations

from pathlib import Path

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
