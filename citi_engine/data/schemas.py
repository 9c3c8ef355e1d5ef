"""Shapes of training data: task types, one example, one validation problem.

Torch-free and dependency-free: the API process imports this module.
A training example is one line of OpenAI chat fine-tuning JSONL, ``{"messages": [...], "tools": [...]}``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

# Every code the validator can report, with what it means. The API documents these as they are.
PROBLEM_CODES: dict[str, str] = {
    "invalid_encoding": "the line is not valid UTF-8",
    "invalid_json": "the line is not one complete JSON value",
    "not_an_object": "the line is JSON but not an object",
    "missing_messages": "the object has no (or an empty) 'messages' list",
    "invalid_field": "a field has the wrong type or shape",
    "unknown_role": "a message role other than system, user, assistant or tool",
    "empty_assistant_turn": "an assistant message with neither text nor tool calls",
    "invalid_arguments_json": "tool call arguments that are not a JSON object encoded as a string",
    "unknown_function": "a tool call (or ground truth) naming a function that is not in 'tools'",
    "invalid_tool_schema": "function parameters that are not a valid JSON Schema object",
    "no_trainable_turn": "no assistant message with weight 1, so nothing to learn from",
    "too_few_examples": "the file holds fewer examples than a job needs",
    "too_long": "an example longer than max_length tokens",
}


class TaskType(enum.IntEnum):
    """What an example teaches. Batches carry it as ``task_type`` (the routing loss needs it)."""

    GENERAL = 0
    TOOL = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an uploaded file: 1-based ``line`` (0 for the whole file), ``code``, ``message``.

    The message says how to fix the problem; ``str(problem)`` is ``line N: CODE: message``.
    """

    line: int
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as the API returns it."""
        return {"line": self.line, "code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"line {self.line}: {self.code}: {self.message}"


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The function description inside a tool entry.

    Accepts the OpenAI shape ``{"type": "function", "function": {...}}`` and, leniently, a bare
    ``{"name", "description", "parameters"}`` dict.
    """
    fn = tool.get("function")
    return fn if isinstance(fn, dict) else tool


def normalize_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool entry in the OpenAI shape ``{"type": "function", "function": {name, description, parameters}}``."""
    return {"type": "function", "function": dict(function_of(tool))}


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    """Names of the functions in a ``tools`` list, in order."""
    return [function_of(t).get("name") for t in tools or [] if isinstance(t, dict)]


def task_type_of(example: dict[str, Any]) -> TaskType:
    """TOOL when the example offers tools or makes a tool call, else GENERAL."""
    if example.get("tools"):
        return TaskType.TOOL
    for msg in example.get("messages") or []:
        if isinstance(msg, dict) and msg.get("tool_calls"):
            return TaskType.TOOL
    return TaskType.GENERAL


class ExampleKind(enum.IntEnum):
    """What an example's answer is, finer than :class:`TaskType`; batches carry it per token as ``token_kind``.

    - GENERAL: a general answer (no tool call), with or without tools in the prompt: its answer tokens are
      trained towards the base model (soft targets) and its tokens routed to the backbone;
    - TOOL: an answer that calls tools: its answer tokens are routed to the experts;
    - NEGATIVE: tools offered, none fits, answered in plain text (learned, so cross-entropy; routed freely).
    """

    GENERAL = 0
    TOOL = 1
    NEGATIVE = 2


# An example built by the engine itself (replay with tools in its prompt) says it is general under this key;
# user data never needs it: their kinds follow from the messages.
KIND_KEY = "citi_kind"


def kind_of(example: dict[str, Any]) -> ExampleKind:
    """GENERAL without tools and calls, TOOL with a tool call, NEGATIVE with tools but no call (an irrelevance
    answer); ``example[KIND_KEY] == "general"`` makes an example with tools GENERAL (engine replay)."""
    if example.get(KIND_KEY) == "general":
        return ExampleKind.GENERAL
    for msg in example.get("messages") or []:
        if isinstance(msg, dict) and msg.get("tool_calls"):
            return ExampleKind.TOOL
    return ExampleKind.NEGATIVE if example.get("tools") else ExampleKind.GENERAL


def task_type_for_kind(kind: ExampleKind) -> TaskType:
    """The routing loss's task type of a kind: only GENERAL examples are general."""
    return TaskType.GENERAL if kind == ExampleKind.GENERAL else TaskType.TOOL


@dataclass
class Example:
    """One parsed training example; ``line`` is where it came from in its file (1-based, 0 if unknown)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    line: int = 0

    @property
    def task_type(self) -> TaskType:
        """TOOL or GENERAL, see :func:`task_type_of`."""
        return task_type_of({"messages": self.messages, "tools": self.tools})

    @classmethod
    def from_dict(cls, data: dict[str, Any], line: int = 0) -> Example:
        """Build from a training-format dict (tools normalised to the OpenAI shape)."""
        return cls(
            messages=list(data["messages"]),
            tools=[normalize_tool(t) for t in data.get("tools") or []],
            line=line,
        )

    def to_dict(self) -> dict[str, Any]:
        """The training-format dict (``tools`` left out when empty)."""
        out: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            out["tools"] = self.tools
        return out
