"""Which models a caller may name: the rule job creation, ``GET /v1/models`` and chat completions share.

The rule itself (:func:`check_model`, :func:`base_model_allowed`) is the service core's
(:mod:`citi_service.model_access`), so the inference server applies the same one; here, what the API adds:
the list ``GET /v1/models`` shows and the 404 for a model the caller cannot use.
"""

from __future__ import annotations

from pathlib import Path

from citi_engine import DEFAULT_MODEL
from citi_service.errors import APIError
from citi_service.settings import Settings


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
