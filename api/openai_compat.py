"""OpenAI's fine-tuning job fields, translated onto ours (torch-free).

OpenAI's jobs take three hyperparameters (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``, each a
number or ``"auto"``), in the top-level ``hyperparameters`` (their older place) or in
``method.supervised.hyperparameters``. Our jobs have per-stage epochs and learning rates. The mapping:

- ``n_epochs`` -> the epochs of the stage that learns the tools: ``epochs_molora`` (CITI's stage 2) for
  ``citi``, ``epochs_train`` for ``lora`` and ``full``. CITI's other stages keep their own epochs
  (``epochs_router_pretraining`` and ``epochs_uco``, 1 each by default), so a CITI job passes over the data
  ``n_epochs + 2`` times in all (``n_epochs + 1`` without stage 3).
- ``batch_size`` -> ``batch_size`` (the same setting; ``"auto"``: our default).
- ``learning_rate_multiplier`` -> multiplies the default learning rate of every stage whose learning rate
  the request does not set itself (``lr_router_pretraining``, ``lr_molora``, ``lr_uco``; ``lr_train``).
- ``"auto"`` leaves our default. ``n_epochs`` together with the setting it maps onto, at another value, is a
  400 (the two would disagree).

The job object reports the three back, resolved: ``n_epochs`` and ``learning_rate_multiplier`` as they are
for the tool-learning stage (its epochs, its learning rate over its default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from citi_engine.training.config import DEFAULT_LR_TRAIN, FinetuneConfig, Hyperparameters
from citi_service.errors import APIError

OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
MAX_N_EPOCHS = 1000  # the engine's range for epochs
_CITI_LRS = ("lr_router_pretraining", "lr_molora", "lr_uco")


def epochs_setting(method: str) -> str:
    """The epochs setting of the stage that learns the tools: ``epochs_molora`` (citi) or ``epochs_train``."""
    return "epochs_molora" if method == "citi" else "epochs_train"


def default_learning_rates(method: str) -> dict[str, float]:
    """Every stage's default learning rate for ``method``, by setting name."""
    if method == "citi":
        defaults = {f.name: f.default for f in dataclasses.fields(Hyperparameters)}
        return {name: defaults[name] for name in _CITI_LRS}
    return {"lr_train": DEFAULT_LR_TRAIN[method]}


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, "invalid_parameters", message, param=param)


def translate_hyperparameters(method: str, hyper: dict[str, Any], where: dict[str, str]) -> dict[str, Any]:
    """``hyper`` (ours and OpenAI's names mixed) as our settings only.

    ``where`` maps each key to the place the request gave it (e.g. ``method.supervised.hyperparameters``),
    so a 400 names the parameter as the caller spelled it.
    """
    out = dict(hyper)
    n_epochs = out.pop("n_epochs", "auto")
    multiplier = out.pop("learning_rate_multiplier", "auto")
    if out.get("batch_size") == "auto":
        del out["batch_size"]

    if n_epochs != "auto":
        param = f"{where.get('n_epochs', 'hyperparameters')}.n_epochs"
        if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or not 1 <= n_epochs <= MAX_N_EPOCHS:
            raise _refuse(param, f"n_epochs must be 'auto' or a whole number from 1 to {MAX_N_EPOCHS}, got "
                          f"{str(n_epochs)[:40]!r}")
        name = epochs_setting(method)
        if name in out and out[name] != n_epochs:
            raise _refuse(param, f"n_epochs={n_epochs} sets {name}, which the request also sets to "
                          f"{str(out[name])[:40]}; give one of the two")
        out[name] = n_epochs

    if multiplier != "auto":
        param = f"{where.get('learning_rate_multiplier', 'hyperparameters')}.learning_rate_multiplier"
        if (isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not math.isfinite(multiplier)
                or multiplier <= 0):
            raise _refuse(param, f"learning_rate_multiplier must be 'auto' or a number above 0, got "
                          f"{str(multiplier)[:40]!r}")
        for name, default in default_learning_rates(method).items():
            if out.get(name) is not None:
                continue  # set by the request itself: kept as given
            lr = default * multiplier
            if lr > 1.0:
                raise _refuse(param, f"learning_rate_multiplier={multiplier:g} makes {name} {lr:g}, above 1; "
                              f"use at most {1.0 / default:g}")
            out[name] = lr
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def openai_hyperparameters(cfg: FinetuneConfig) -> dict[str, Any]:
    """OpenAI's three hyperparameters as the job runs them (the tool-learning stage's epochs and rate)."""
    return openai_view(cfg.method, dataclasses.asdict(cfg.hyperparameters))


def openai_view(method: str, hyper: dict[str, Any]) -> dict[str, Any]:
    """:func:`openai_hyperparameters` from a stored job's ``method.type`` and resolved hyperparameters (jobs
    stored before the three were recorded get them this way)."""
    name = "lr_molora" if method == "citi" else "lr_train"
    default = default_learning_rates(method)[name]
    lr = hyper.get(name) or default
    return {
        "n_epochs": _number(hyper[epochs_setting(method)]),
        "batch_size": hyper["batch_size"],
        "learning_rate_multiplier": _number(round(lr / default, 6)),
    }
