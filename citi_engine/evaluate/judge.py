"""Judge a model's tool calls against accepted answers by structure (AST match), the way BFCL does.

Torch-free: the API can import it to check test files, and tests run it without a model.

Ground truth is BFCL's shape: a list of expected calls, each ``{function_name: {param: [accepted values]}}``.
A parameter whose accepted values include ``""`` may be omitted. An empty list means the right answer
is no call at all (an irrelevance case). Predicted calls are OpenAI-shaped
(``{"function": {"name", "arguments": "<JSON>"}}``) or plain ``{"name", "arguments": {...}}``.

One call matches one expected call when, in this order,
1. the function name is the same (``wrong_name``);
2. it uses no parameter the function does not define, nor one the answer does not list
   (``unexpected_parameter``);
3. every required parameter, and every listed one that may not be omitted, is there
   (``missing_parameter``);
4. every value has the JSON Schema type the function declares (``wrong_type``); an integer passes
   for ``number``, a boolean never passes for a number;
5. every value is one of the accepted ones (``wrong_value``): strings compared case-insensitively with
   whitespace and the punctuation in :data:`STRIP_CHARS` removed, numbers by value, lists element by
   element, objects key by key with the same rules.
Parallel calls match in any order (a bipartite assignment), but the number of calls must be equal
(``wrong_count``). A reply with no call where one was expected fails with ``no_call``, or
``unparseable`` when it tried to call (a ``<tool_call>`` block or arguments that are not valid JSON);
a call where none was expected fails with ``unexpected_call``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

REASONS = (
    "wrong_name",
    "missing_parameter",
    "unexpected_parameter",
    "wrong_type",
    "wrong_value",
    "wrong_count",
    "no_call",
    "unexpected_call",
    "unparseable",
)

# Characters dropped before comparing strings: whitespace and the separators that models (and
# annotators) use inconsistently, as BFCL's standardisation does; quotes because models sometimes
# quote a value inside the JSON string.
STRIP_CHARS = frozenset(" \t\n\r,./-_*^'\"")

# BFCL writes Python-flavoured type names; map them to JSON Schema's.
_TYPE_ALIASES = {
    "dict": "object",
    "float": "number",
    "double": "number",
    "int": "integer",
    "long": "integer",
    "tuple": "array",
    "list": "array",
    "bool": "boolean",
    "str": "string",
    "any": None,
}


@dataclass(frozen=True)
class Verdict:
    """The judgement of one reply: ``correct``, and for a failure its ``reason`` (one of :data:`REASONS`)."""

    correct: bool
    reason: str | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        return {"correct": self.correct, "reason": self.reason, "detail": self.detail}


_PASS = Verdict(True)


def _fail(reason: str, detail: str) -> Verdict:
    return Verdict(False, reason, detail)


# ----------------------------------------------------------------------------------------- schemas


def json_schema_type(bfcl_or_json_type: str | None) -> str | None:
    """The JSON Schema name of a BFCL or JSON Schema type (``dict`` -> ``object``, ``float`` -> ``number``);
    ``None`` for ``any`` or no type."""
    if bfcl_or_json_type is None:
        return None
    return _TYPE_ALIASES.get(bfcl_or_json_type, bfcl_or_json_type)


def to_json_schema(schema: dict) -> dict:
    """A copy of a BFCL parameter schema with JSON Schema type names, recursively (``any`` drops the type)."""
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for key, value in schema.items():
        if key == "type":
            if isinstance(value, list):
                names = [json_schema_type(t) for t in value]
                if None not in names:
                    out["type"] = names
            elif json_schema_type(value) is not None:
                out["type"] = json_schema_type(value)
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {k: to_json_schema(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = to_json_schema(value)
        else:
            out[key] = value
    return out


def function_docs(tools: Iterable[dict]) -> dict[str, dict]:
    """Map function name -> its parameters schema, from OpenAI tools or BFCL function docs."""
    docs: dict[str, dict] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters") or {}
        docs[fn["name"]] = params if isinstance(params, dict) else {}
    return docs


# ----------------------------------------------------------------------------------- normalisation


def normalize_string(text: str) -> str:
    """Lower-case ``text`` and drop whitespace and the characters in :data:`STRIP_CHARS`."""
    return "".join(ch for ch in text.lower() if ch not in STRIP_CHARS)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_error(value: object, schema: dict | None, path: str) -> str | None:
    """Why ``value`` does not have the type ``schema`` declares, or ``None`` when it does."""
    if not isinstance(schema, dict):
        return None
    declared = schema.get("type")
    names = declared if isinstance(declared, list) else [declared]
    names = [json_schema_type(n) for n in names]
    if None in names:
        return None

    def fits(name: str) -> bool:
        if name == "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        if name == "number":
            return _is_number(value)
        if name == "string":
            return isinstance(value, str)
        if name == "boolean":
            return isinstance(value, bool)
        if name == "array":
            return isinstance(value, list)
        if name == "object":
            return isinstance(value, dict)
        if name == "null":
            return value is None
        return True  # a type we do not know: do not fail the model for our ignorance

    matching = [n for n in names if fits(n)]
    if not matching:
        return f"'{path}' should be {' or '.join(names)}, got {type(value).__name__} {json.dumps(value)[:60]}"
    if "array" in matching and isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            err = _type_error(item, schema["items"], f"{path}[{i}]")
            if err:
                return err
    if "object" in matching and isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        for key, item in value.items():
            err = _type_error(item, schema["properties"].get(key), f"{path}.{key}")
            if err:
                return err
    return None


def _matches(value: object, accepted: object) -> bool:
    """Whether ``value`` equals one accepted value (``accepted`` is a single candidate, not the list)."""
    if isinstance(accepted, dict):
        # BFCL writes an accepted object as {key: [accepted values]}; a key whose list holds "" may be left out.
        if not isinstance(value, dict):
            return False
        options = {k: (v if isinstance(v, list) else [v]) for k, v in accepted.items()}
        if any(k not in options for k in value):
            return False
        for key, allowed in options.items():
            if key not in value:
                if "" not in allowed:
                    return False
            elif not any(_matches(value[key], a) for a in allowed):
                return False
        return True
    if isinstance(accepted, list):
        return (
            isinstance(value, list)
            and len(value) == len(accepted)
            and all(_matches(v, a) for v, a in zip(value, accepted, strict=True))
        )
    if isinstance(accepted, bool) or isinstance(value, bool):
        return isinstance(accepted, bool) and isinstance(value, bool) and accepted == value
    if _is_number(accepted):
        return _is_number(value) and math.isclose(float(value), float(accepted), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(accepted, str):
        return isinstance(value, str) and normalize_string(value) == normalize_string(accepted)
    return value == accepted


def exact_ground_truth(calls: list[dict]) -> list[dict]:
    """Ground truth that accepts exactly the given calls (from a training-format assistant turn).

    Values are wrapped into BFCL's accepted-values shape, objects recursively, so that the judge reads
    them with the same rules (string normalisation included) as BFCL answers.
    """

    def wrap(value: object) -> object:
        if isinstance(value, dict):
            return {k: [wrap(v)] for k, v in value.items()}
        if isinstance(value, list):
            return [wrap(v) for v in value]
        return value

    truth = []
    for call in calls:
        name, args = call_name_and_arguments(call)
        if not isinstance(args, dict):
            raise ValueError(f"the arguments of call '{name}' are not a JSON object")
        truth.append({name: {k: [wrap(v)] for k, v in args.items()}})
    return truth


# --------------------------------------------------------------------------------------- the judge


def call_name_and_arguments(call: dict) -> tuple[str, object]:
    """``(name, arguments)`` of an OpenAI-shaped or plain call; arguments decoded from a JSON string.

    Raises ``ValueError`` when the arguments are a string that is not valid JSON.
    """
    fn = call.get("function", call) if isinstance(call, dict) else {}
    name = fn.get("name") if isinstance(fn, dict) else None
    args = fn.get("arguments", {}) if isinstance(fn, dict) else None
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    return (name if isinstance(name, str) else ""), args


def judge_call(call: dict, expected: dict, docs: dict[str, dict] | None = None) -> Verdict:
    """Judge one predicted call against one expected call ``{name: {param: [accepted values]}}``."""
    (expected_name, accepted), = expected.items()
    try:
        name, args = call_name_and_arguments(call)
    except (ValueError, TypeError) as exc:
        return _fail("unparseable", f"arguments are not valid JSON: {exc}")
    if not isinstance(args, dict):
        return _fail("unparseable", f"arguments of '{name}' are not a JSON object")
    if name != expected_name:
        return _fail("wrong_name", f"called '{name}', expected '{expected_name}'")

    schema = (docs or {}).get(name)
    properties = schema.get("properties") if isinstance(schema, dict) else None
    defined = set(properties) if isinstance(properties, dict) else set(accepted)
    required = set(schema.get("required", [])) if isinstance(schema, dict) else set()

    for param in args:
        if param not in defined:
            return _fail("unexpected_parameter", f"'{name}' has no parameter '{param}'")
        if param not in accepted:
            return _fail("unexpected_parameter", f"'{param}' should not be given to '{name}'")
    for param in sorted(required):
        if param not in args:
            return _fail("missing_parameter", f"required parameter '{param}' of '{name}' is missing")
    for param, allowed in accepted.items():
        if param not in args and "" not in allowed:
            return _fail("missing_parameter", f"parameter '{param}' of '{name}' is missing")
    for param, value in args.items():
        err = _type_error(value, (properties or {}).get(param), param)
        if err:
            return _fail("wrong_type", err)
    for param, value in args.items():
        allowed = accepted[param]
        if not any(_matches(value, a) for a in allowed):
            shown = [a for a in allowed if a != ""]
            return _fail("wrong_value", f"'{param}' = {json.dumps(value)[:80]}, accepted {json.dumps(shown)[:120]}")
    return _PASS


def _max_matching(ok: list[list[bool]]) -> list[int]:
    """A maximum bipartite matching (augmenting paths); ``result[j]`` is the call matched to answer j, or -1."""
    n_calls = len(ok)
    n_answers = len(ok[0]) if ok else 0
    owner = [-1] * n_answers

    def augment(i: int, seen: list[bool]) -> bool:
        for j in range(n_answers):
            if ok[i][j] and not seen[j]:
                seen[j] = True
                if owner[j] == -1 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(n_calls):
        augment(i, [False] * n_answers)
    return owner


def judge(
    tool_calls: list[dict] | None,
    ground_truth: list[dict],
    tools: Iterable[dict] | None = None,
    *,
    text: str = "",
) -> Verdict:
    """Judge a reply's parsed ``tool_calls`` against ``ground_truth`` (``[]``: the answer is no call).

    ``tools`` (OpenAI tools or BFCL function docs) give the declared types and required parameters.
    ``text`` is the raw reply; it tells a failed attempt to call (``unparseable``) from no attempt.
    """
    calls = list(tool_calls or [])
    attempted = looks_like_call_attempt(text)
    if not ground_truth:
        if calls:
            names = ", ".join(call_name(c) for c in calls)
            return _fail("unexpected_call", f"no call was expected, got {names}")
        if attempted:
            return _fail("unparseable", "no call was expected, and the reply holds a malformed call")
        return _PASS
    if not calls:
        if attempted:
            return _fail("unparseable", "the reply tries to call a tool but no call could be parsed")
        return _fail("no_call", f"expected {len(ground_truth)} call(s), the reply calls nothing")
    if len(calls) != len(ground_truth):
        return _fail("wrong_count", f"expected {len(ground_truth)} call(s), got {len(calls)}")

    docs = function_docs(tools or [])
    verdicts = [[judge_call(c, g, docs) for g in ground_truth] for c in calls]
    ok = [[v.correct for v in row] for row in verdicts]
    owner = _max_matching(ok)
    if all(i != -1 for i in owner):
        return _PASS
    # Explain the failure with a call left over: prefer one that calls the same function as the
    # unmatched answer, so the reason names the parameter that went wrong rather than the name.
    free_calls = [i for i in range(len(calls)) if i not in owner]
    j = owner.index(-1)
    expected_name = next(iter(ground_truth[j]))
    same_name = [i for i in free_calls if call_name(calls[i]) == expected_name]
    i = (same_name or free_calls)[0]
    return verdicts[i][j]


def call_name(call: dict) -> str:
    """The function name of a call, or ``"?"`` when it has none."""
    fn = call.get("function", call) if isinstance(call, dict) else {}
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else "?"


def looks_like_call_attempt(text: str) -> bool:
    """Whether a reply tries to call a tool: a ``<tool_call>`` tag, or a JSON object with name and arguments."""
    if not text:
        return False
    return "<tool_call" in text or ('"name"' in text and '"arguments"' in text)
