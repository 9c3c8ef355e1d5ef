"""Errors the engine raises. Each carries a machine-readable ``code`` and a message that says how to fix it."""

from __future__ import annotations


class CitiError(Exception):
    """Base class for errors a caller can act on."""

    code = "citi_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def to_dict(self) -> dict:
        return {"code": self.code, "param": self.param, "message": self.message}


class ModelSpecError(CitiError):
    """A model spec that cannot be resolved or loaded (unknown, not allowed, offline)."""

    code = "model_not_found"


class DataValidationError(CitiError):
    """A training or test file with problems; ``problems`` lists every one of them."""

    code = "invalid_file"

    def __init__(self, message: str, problems: list | None = None, *, param: str | None = "training_file"):
        super().__init__(message, param=param)
        self.problems = list(problems or [])

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["details"] = [p.to_dict() if hasattr(p, "to_dict") else p for p in self.problems]
        return d


class BudgetError(CitiError):
    """A budget too small for one step of every stage, or otherwise impossible."""

    code = "invalid_budget"


class Cancelled(CitiError):
    """Raised inside the engine when the caller's cancel flag turns true."""

    code = "cancelled"

    def __init__(self, message: str = "the job was cancelled"):
        super().__init__(message)


class TrainingDiverged(CitiError):
    """The training loss became NaN or infinite: the run stops before the weights are poisoned."""

    code = "training_diverged"

    def __init__(self, message: str):
        super().__init__(message, param="hyperparameters")
