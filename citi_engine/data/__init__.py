"""Training data: shapes, validation and chat rendering. Torch-free; safe to import in the API process."""

from citi_engine.data.schemas import Example, Problem, TaskType
from citi_engine.data.validate import (
    JsonlValidator,
    ValidationReport,
    check_lengths,
    validate_jsonl,
    validate_stream,
)

__all__ = [
    "Example",
    "JsonlValidator",
    "Problem",
    "TaskType",
    "ValidationReport",
    "check_lengths",
    "validate_jsonl",
    "validate_stream",
]
