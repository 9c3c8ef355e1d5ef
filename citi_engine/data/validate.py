"""Validate a training (or tool test) file before any job runs, reporting every problem at once.

A file is OpenAI chat fine-tuning JSONL, one example a line (see docs/CONTRACTS.md). Each problem carries
its 1-based line (0 for the whole file), a machine-readable code and a message saying how to fix it. A file
with any problem is refused as a whole: ``report.examples`` is filled only when ``report.ok``.

The API checks uploads of tens of MB with :class:`JsonlValidator` (:func:`validate_stream`) one line at a time
as they are stored, so its memory holds one line, not the file; every distinct tool schema is checked once.
It imports neither torch nor transformers; jsonschema is imported only when a file defines tools.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from citi_engine.data.schemas import ROLES, Problem, TaskType, function_of, normalize_tool, task_type_of
from citi_engine.errors import DataValidationError

# Names as OpenAI allows them, plus dots (BFCL names functions like `math.factorial`).
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_PURPOSES = ("train", "test")
_ROLE_HINTS = {"human": "user", "bot": "assistant", "model": "assistant", "gpt": "assistant", "ai": "assistant",
               "function": "tool", "developer": "system"}
READ_CHUNK = 1024 * 1024
# Distinct tool schemas whose verdict is remembered (by digest); past this the memory starts over.
_SCHEMA_CACHE = 100_000
_EXAMPLE_LINE = (
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], "tools": [...]}'
)


@dataclass
class ValidationReport:
    """What :func:`validate_jsonl` found.

    ``examples`` holds the parsed examples (tools in the OpenAI shape) only when ``ok``; ``lines`` gives
    each example's line in the file. ``n_tool`` and ``n_general`` count the examples of each task type.
    ``problem_count`` and ``problem_line_count`` count every problem and every line with one, also those a
    :class:`JsonlValidator` with ``max_problems`` did not keep in ``problems``.
    """

    problems: list[Problem] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    n_examples: int = 0
    n_tool: int = 0
    n_general: int = 0
    problem_count: int = 0
    problem_line_count: int = 0

    @property
    def ok(self) -> bool:
        """True when the file has no problem at all."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for ``--json`` output and the API)."""
        return {
            "ok": self.ok,
            "n_examples": self.n_examples,
            "n_tool": self.n_tool,
            "n_general": self.n_general,
            "problems": [p.to_dict() for p in self.problems],
        }

    def raise_if_invalid(self, param: str = "training_file") -> None:
        """Raise :class:`DataValidationError` listing every problem, unless the file is fine."""
        if self.ok:
            return
        shown = "; ".join(str(p) for p in self.problems[:3])
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        raise DataValidationError(
            f"{param} has {len(self.problems)} problem(s): {shown}{more}", self.problems, param=param
        )


def _read_bytes(data: bytes | str | os.PathLike) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, os.PathLike):
        return Path(data).read_bytes()
    if isinstance(data, str):
        # A short one-line string naming an existing file is a path; anything else is the file's text.
        if "\n" not in data and len(data) < 4096 and os.path.isfile(data):
            return Path(data).read_bytes()
        return data.encode("utf-8", errors="surrogatepass")
    raise TypeError(f"validate_jsonl takes bytes, a str or a path, not {type(data).__name__}")


class _SchemaChecker:
    """Checks function parameters against the JSON Schema metaschema, once per distinct schema."""

    def __init__(self) -> None:
        self._seen: dict[bytes, str | None] = {}
        self._validators: dict[type, Any] = {}

    def error(self, params: Any) -> str | None:
        if not isinstance(params, dict):
            return f"'parameters' must be a JSON Schema object such as {{\"type\": \"object\", \"properties\": {{...}}}}, got {type(params).__name__}"
        # A digest, not the schema itself: a file of large distinct schemas must not be held twice.
        key = hashlib.blake2b(json.dumps(params, sort_keys=True, default=str).encode(), digest_size=16).digest()
        if key not in self._seen:
            if len(self._seen) >= _SCHEMA_CACHE:
                self._seen.clear()
            self._seen[key] = self._check(params)
        return self._seen[key]

    def _check(self, params: dict[str, Any]) -> str | None:
        if params.get("type", "object") != "object":
            return (
                f"'parameters' must describe an object (\"type\": \"object\"), got type {params.get('type')!r}; put the "
                "arguments under \"properties\""
            )
        try:
            from jsonschema import exceptions, validators
        except ImportError:
            # GPU benchmark hosts carry only the training path; the API has already run the full check on upload.
            return None

        # Draft 7 unless the schema names its own: it covers what function schemas use, and its metaschema
        # checks about 3.5x faster than 2020-12's (measured on BFCL schemas), which matters on large uploads.
        cls = validators.validator_for(params, default=validators.Draft7Validator)
        if cls not in self._validators:
            meta_cls = validators.validator_for(cls.META_SCHEMA, default=cls)
            self._validators[cls] = meta_cls(cls.META_SCHEMA)
        errors = sorted(self._validators[cls].iter_errors(params), key=exceptions.relevance)
        if not errors:
            return None
        found = []
        for top in errors[:3]:
            err = exceptions.best_match([top])  # descends into anyOf/oneOf to the error that explains most
            where = "/".join(str(p) for p in err.absolute_path) or "the top level"
            hint = ""
            if list(err.absolute_path)[-1:] == ["type"]:
                hint = " (JSON Schema types are object, array, string, number, integer, boolean and null)"
            found.append(f"at {where}: {err.message}{hint}")
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        return "'parameters' is not valid JSON Schema " + "; ".join(found) + more


class _LineChecker:
    """The checks for one example; collects problems for its line."""

    def __init__(self, line: int, purpose: str, schemas: _SchemaChecker):
        self.line = line
        self.purpose = purpose
        self.schemas = schemas
        self.problems: list[Problem] = []

    def add(self, code: str, message: str) -> None:
        self.problems.append(Problem(self.line, code, message))

    def check(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.add("not_an_object", f"each line must be one JSON object like {_EXAMPLE_LINE}, got a {_json_kind(obj)}")
            return
        names = self.check_tools(obj.get("tools"))
        messages = obj.get("messages")
        if messages is None:
            self.add("missing_messages", f"the object has no 'messages' list; each line needs one, like {_EXAMPLE_LINE}")
            return
        if not isinstance(messages, list):
            self.add("invalid_field", f"'messages' must be a list of message objects, got a {_json_kind(messages)}")
            return
        if not messages:
            self.add("missing_messages", "'messages' is empty; give at least a user message and an assistant answer")
            return
        trainable = False
        for k, msg in enumerate(messages):
            trainable |= self.check_message(k, msg, names)
        if self.purpose == "train":
            if not trainable:
                self.add(
                    "no_trainable_turn",
                    "the example has no assistant message to learn from (or all have \"weight\": 0); add the "
                    "assistant's answer or set its weight to 1",
                )
        else:
            self.check_ground_truth(obj, messages, names)

    def check_tools(self, tools: Any) -> set[str] | None:
        """The function names the example defines (None when 'tools' is unusable)."""
        if tools is None:
            return set()
        if not isinstance(tools, list):
            self.add(
                "invalid_field",
                "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", \"description\", "
                f"\"parameters\"}}}} objects, got a {_json_kind(tools)}",
            )
            return None
        names: set[str] = set()
        for j, tool in enumerate(tools):
            where = f"tools[{j}]"
            if not isinstance(tool, dict) or not (isinstance(tool.get("function"), dict) or "name" in tool):
                self.add(
                    "invalid_field",
                    f"{where} must look like {{\"type\": \"function\", \"function\": {{\"name\": ..., \"description\": ..., "
                    "\"parameters\": {...}}}}",
                )
                continue
            if "function" in tool and tool.get("type", "function") != "function":
                self.add("invalid_field", f"{where}.type must be \"function\", got {tool.get('type')!r}")
            fn = function_of(tool)
            name = fn.get("name")
            if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
                self.add(
                    "invalid_field",
                    f"{where} has function name {name!r}; use 1-128 letters, digits, '_', '-' or '.'",
                )
                continue
            if name in names:
                self.add("invalid_field", f"{where} defines function '{name}' a second time; keep one definition")
            names.add(name)
            if "description" in fn and not isinstance(fn["description"], str):
                self.add("invalid_field", f"{where}.function.description must be a string")
            if fn.get("parameters") is not None:
                error = self.schemas.error(fn["parameters"])
                if error:
                    self.add("invalid_tool_schema", f"function '{name}': {error}")
        return names

    def check_message(self, k: int, msg: Any, names: set[str] | None) -> bool:
        """Check messages[k]; True when it is an assistant turn with weight 1 (even an empty one, which gets
        its own problem)."""
        where = f"messages[{k}]"
        if not isinstance(msg, dict):
            self.add("invalid_field", f"{where} must be an object with 'role' and 'content', got a {_json_kind(msg)}")
            return False
        role = msg.get("role")
        if role not in ROLES:
            hint = f" ('{_ROLE_HINTS[role]}' is probably meant)" if isinstance(role, str) and role in _ROLE_HINTS else ""
            self.add("unknown_role", f"{where} has role {role!r}; use one of {', '.join(ROLES)}{hint}")
            return False
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            self.add("invalid_field", f"{where}.content must be a string, got a {_json_kind(content)}")
            content = None
        weight = msg.get("weight", 1)
        if "weight" in msg and (role != "assistant" or isinstance(weight, bool) or weight not in (0, 1)):
            self.add("invalid_field", f"{where}.weight must be 0 or 1 and only on assistant messages, got {weight!r}")
            weight = 1
        if role in ("system", "user", "tool"):
            if content is None and "content" not in msg:
                self.add("invalid_field", f"{where} ({role}) needs a string 'content'")
            elif msg.get("content") is None:
                self.add("invalid_field", f"{where} ({role}) has null content; give a string")
            if role != "tool" and "tool_calls" in msg:
                self.add("invalid_field", f"{where}: only assistant messages may carry 'tool_calls'")
            return False
        calls = msg.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            self.add("invalid_field", f"{where}.tool_calls must be a list of calls, got a {_json_kind(calls)}")
            calls = None
        for c, call in enumerate(calls or []):
            self.check_call(f"{where}.tool_calls[{c}]", call, names)
        if not (content and content.strip()) and not calls:
            self.add(
                "empty_assistant_turn",
                f"{where} is an assistant message with no text and no tool calls; give its answer in 'content' "
                "or its calls in 'tool_calls'",
            )
        return weight != 0

    def check_call(self, where: str, call: Any, names: set[str] | None) -> None:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            self.add(
                "invalid_field",
                f"{where} must look like {{\"id\": \"call_1\", \"type\": \"function\", \"function\": "
                "{\"name\": ..., \"arguments\": \"{...}\"}}",
            )
            return
        if call.get("type", "function") != "function":
            self.add("invalid_field", f"{where}.type must be \"function\", got {call.get('type')!r}")
        if "id" in call and not isinstance(call["id"], str):
            self.add("invalid_field", f"{where}.id must be a string")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            self.add("invalid_field", f"{where}.function.name must be the name of a function in 'tools'")
        elif names is not None and name not in names:
            defined = ", ".join(sorted(names)) or "none"
            self.add(
                "unknown_function",
                f"{where} calls '{name}', which this example's 'tools' does not define (defined: {defined}); "
                "add its definition to 'tools' or correct the name",
            )
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            fix = " (encode the object with json.dumps)" if isinstance(arguments, dict) else ""
            self.add(
                "invalid_field",
                f"{where}.function.arguments must be a string holding a JSON object, got a {_json_kind(arguments)}{fix}",
            )
            return
        try:
            decoded = json.loads(arguments)
        except (ValueError, RecursionError) as exc:
            self.add(
                "invalid_arguments_json",
                f"{where}.function.arguments is not valid JSON ({exc}); it must encode an object such as "
                "'{\"city\": \"Paris\"}'",
            )
            return
        if not isinstance(decoded, dict):
            self.add(
                "invalid_arguments_json",
                f"{where}.function.arguments encodes a {_json_kind(decoded)}; it must encode an object such as "
                "'{\"city\": \"Paris\"}' (use '{}' for no arguments)",
            )

    def check_ground_truth(self, obj: dict[str, Any], messages: list[Any], names: set[str] | None) -> None:
        if "category" in obj and not isinstance(obj["category"], str):
            self.add("invalid_field", "'category' must be a string such as \"simple_python\"")
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant" and "ground_truth" not in obj:
            return  # the final assistant turn is the exact expected answer
        truth = obj.get("ground_truth")
        shape = "[{\"<function name>\": {\"<param>\": [accepted values...]}}] ([] when no call is right)"
        if not isinstance(truth, list):
            self.add("invalid_field", f"a test line needs 'ground_truth' as a list: {shape}")
            return
        for g, entry in enumerate(truth):
            if not isinstance(entry, dict) or len(entry) != 1:
                self.add("invalid_field", f"ground_truth[{g}] must be an object with exactly one function name: {shape}")
                continue
            (name, params), = entry.items()
            if names is not None and name not in names:
                self.add("unknown_function", f"ground_truth[{g}] names '{name}', which 'tools' does not define")
            if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
                self.add(
                    "invalid_field",
                    f"ground_truth[{g}]['{name}'] must map each parameter to a list of accepted values",
                )


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def validate_jsonl(
    data: bytes | str | os.PathLike, *, min_examples: int = 10, purpose: str = "train"
) -> ValidationReport:
    """Check a JSONL file (its bytes, its text, or its path) and report every problem at once.

    ``purpose="train"`` checks training examples; ``purpose="test"`` checks tool test lines instead (a
    ``ground_truth`` list or a final assistant turn instead of a trainable turn). Blank lines are skipped
    but count for line numbers. Fewer than ``min_examples`` examples is a whole-file problem (line 0).
    A path is read one line at a time; the examples of a good file are kept in ``report.examples``.
    """
    validator = JsonlValidator(min_examples=min_examples, purpose=purpose)
    if isinstance(data, os.PathLike) or (
        isinstance(data, str) and "\n" not in data and len(data) < 4096 and os.path.isfile(data)
    ):
        with open(data, "rb") as src:
            validate_stream(src, validator)
        return validator.finish()
    for line in _read_bytes(data).split(b"\n"):
        validator.feed(line)
    return validator.finish()


class JsonlValidator:
    """Validates a JSONL file one line at a time, so a file of any size is checked in bounded memory.

    Call :meth:`feed` with each line (as split on ``\\n``; blank lines count for line numbers), then
    :meth:`finish` for the report; the checks and messages are those of :func:`validate_jsonl`, which is
    built on it. ``keep_examples=False`` keeps no parsed example (the API only needs the counts), and
    ``max_problems`` keeps only the first problems while still counting all of them
    (``report.problem_count``, ``report.problem_line_count``).
    """

    def __init__(self, *, min_examples: int = 10, purpose: str = "train", keep_examples: bool = True,
                 max_problems: int | None = None):
        if purpose not in _PURPOSES:
            raise ValueError(f"purpose must be one of {_PURPOSES}, got {purpose!r}")
        self.min_examples, self.purpose = min_examples, purpose
        self.keep_examples, self.max_problems = keep_examples, max_problems
        self.report = ValidationReport()
        self.line = 0
        self._schemas = _SchemaChecker()
        self._parsed: list[tuple[int, dict[str, Any]]] = []

    def _add(self, problems: list[Problem]) -> None:
        if not problems:
            return
        self.report.problem_count += len(problems)
        self.report.problem_line_count += any(p.line for p in problems)
        room = len(problems) if self.max_problems is None else max(0, self.max_problems - len(self.report.problems))
        self.report.problems.extend(problems[:room])

    def feed(self, line_bytes: bytes) -> None:
        """Check the next line of the file (with or without its trailing newline)."""
        self.line += 1
        if self.line == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):
            line_bytes = line_bytes[3:]  # a UTF-8 byte-order mark, as some editors write
        if line_bytes.endswith(b"\n"):
            line_bytes = line_bytes[:-1]
        if not line_bytes.strip():
            return
        report = self.report
        report.n_examples += 1
        checker = _LineChecker(self.line, self.purpose, self._schemas)
        try:
            text = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            checker.add(
                "invalid_encoding",
                f"byte {exc.start + 1} of the line is not UTF-8; save the file as UTF-8",
            )
            self._add(checker.problems)
            return
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            checker.add(
                "invalid_json",
                f"the line is not valid JSON ({exc}); each line must hold one complete JSON object, with no line "
                "breaks inside it",
            )
            self._add(checker.problems)
            return
        checker.check(obj)
        self._add(checker.problems)
        if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            if task_type_of(obj) == TaskType.TOOL:
                report.n_tool += 1
            else:
                report.n_general += 1
            if not checker.problems and self.keep_examples and report.ok:
                self._parsed.append((self.line, obj))

    def too_long(self, limit: int) -> None:
        """Count the next line as one longer than ``limit`` bytes (read no further by the caller)."""
        self.line += 1
        self.report.n_examples += 1
        self._add([Problem(self.line, "line_too_long",
                           f"the line is longer than {limit} bytes; one example must fit in that (shorten it or "
                           "drop tools it does not need)")])

    def finish(self) -> ValidationReport:
        """The report of every line fed so far (the examples only when the file has no problem)."""
        report = self.report
        if report.n_examples < self.min_examples:
            self._add([
                Problem(
                    0,
                    "too_few_examples",
                    f"the file holds {report.n_examples} example(s); at least {self.min_examples} are needed, so "
                    "add more",
                )
            ])
        if report.ok:
            for number, obj in self._parsed:
                if obj.get("tools"):
                    obj = {**obj, "tools": [normalize_tool(t) for t in obj["tools"]]}
                report.examples.append(obj)
                report.lines.append(number)
        self._parsed = []
        return report


def validate_stream(src: BinaryIO, validator: JsonlValidator, *, max_line_bytes: int | None = None,
                    on_chunk: Callable[[bytes], None] | None = None) -> JsonlValidator:
    """Feed ``validator`` the lines of the binary stream ``src``, holding one line in memory at a time.

    ``on_chunk`` receives every byte read, in order (to store the file while it is checked). A line longer
    than ``max_line_bytes`` is reported as ``line_too_long`` and passed on in pieces, never held whole.
    """
    limit = -1 if max_line_bytes is None else max_line_bytes + 1
    while line := src.readline(limit):
        if on_chunk is not None:
            on_chunk(line)
        if max_line_bytes is not None and len(line) > max_line_bytes and not line.endswith(b"\n"):
            validator.too_long(max_line_bytes)
            while piece := src.readline(READ_CHUNK):  # the rest of the overlong line, a piece at a time
                if on_chunk is not None:
                    on_chunk(piece)
                if piece.endswith(b"\n"):
                    break
            continue
        validator.feed(line)
    return validator


def check_lengths(
    examples: list[dict[str, Any]], tokenizer: Any, max_length: int, *, lines: list[int] | None = None
) -> list[Problem]:
    """One ``too_long`` problem for each example longer than ``max_length`` tokens once rendered.

    ``lines`` gives the examples' line numbers (``report.lines``); by default example i is line i+1.
    Rendering and tokenising use :func:`citi_engine.data.chat_format.encode_example`, exactly as training does.
    """
    from citi_engine.data.chat_format import encode_example

    problems = []
    for i, example in enumerate(examples):
        encoded = encode_example(tokenizer, example, max_length)
        if encoded["truncated"]:
            line = lines[i] if lines is not None else i + 1
            problems.append(
                Problem(
                    line,
                    "too_long",
                    f"the example is {encoded['num_tokens']} tokens once rendered, more than max_length="
                    f"{max_length}; shorten or split the conversation, drop tools it does not need, or raise "
                    "max_length",
                )
            )
    return problems
