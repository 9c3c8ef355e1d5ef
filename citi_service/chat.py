"""The chat completion request (OpenAI's shape) and the checks both HTTP servers apply to it.

The API validates a request here before it forwards it, and the inference server validates it again
here when it arrives, so a request is judged the same wherever it lands. Checks that need the tokenizer
(prompt plus ``max_tokens`` over the context length) happen in the inference server only.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from citi_service.errors import APIError
from citi_service.settings import get_settings

# OpenAI's rule for function names, plus dots: many real APIs name functions like `calendar.create_event`, and the
# training data validator accepts them, so a model trained on such names must be callable with them.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_STOP = 4
# Parameters OpenAI knows that this service cannot honour: refused rather than silently ignored.
UNSUPPORTED = {
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "functions": (None,),
    "function_call": (None,),
}


class _Open(BaseModel):
    """A part of the request that tolerates fields we do not use (clients send more than we read)."""

    model_config = ConfigDict(extra="allow")


class FunctionDefinition(_Open):
    """A function the model may call."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Open):
    """An entry of ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolCallFunction(_Open):
    """The function part of a tool call: its name and arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(_Open):
    """A call an assistant message made earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(_Open):
    """A text part of a message's content (other part types are not supported)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Open):
    """One message: system (or developer), user, assistant (text and/or tool calls) or tool (a result)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class FunctionName(_Open):
    """``{"name": ...}`` inside a named tool choice."""

    name: str


class NamedToolChoice(_Open):
    """``{"type": "function", "function": {"name": ...}}``: the model must call this function."""

    type: Literal["function"] = "function"
    function: FunctionName


class ResponseFormat(_Open):
    """``response_format``: ``text`` (free), ``json_object`` (a JSON object) or ``json_schema`` (JSON valid against
    ``json_schema.schema``). Enforced by constrained decoding on the inference server."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @property
    def reply_schema(self) -> dict[str, Any] | None:
        """The JSON schema a ``json_schema`` reply must follow (None for ``json_object``: any object)."""
        return (self.json_schema or {}).get("schema") if self.type == "json_schema" else None


class StreamOptions(_Open):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """The body of ``POST /v1/chat/completions`` (OpenAI's shape; unknown fields are ignored)."""

    model: str = Field(min_length=1, description="A base model spec or a fine_tuned_model id (see GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Sampling seed, a 64-bit integer.")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(None, ge=1)
    call_threshold: float | None = Field(
        None, ge=0.0, le=100.0, description="Our extension: how far the tokens that open a tool call must lead every "
        "other token at the reply's start for the reply to be a call (tool_choice auto). Default: the threshold the "
        "fine-tuning job chose (calibration.json; 0 for base models); 0 turns it off for this request.")
    citi_adapter: dict[str, Any] | None = Field(
        None, description="Internal: set by the API for the inference server; refused from callers."
    )

    @model_validator(mode="after")
    def _stop_list(self) -> ChatCompletionRequest:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"'stop' takes at most {MAX_STOP} strings, got {len(self.stop)}")
        return self

    # -- what the engine needs -------------------------------------------------------------------

    @property
    def stop_list(self) -> list[str]:
        """``stop`` as a list of non-empty strings."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def completion_limit(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens`` (OpenAI's deprecated name for it)."""
        return self.max_completion_tokens or self.max_tokens

    def tool_mode(self) -> tuple[str, str | None]:
        """``(mode, function name)``: mode ``none``, ``auto``, ``required`` or ``named``.

        Without ``tool_choice`` the mode is ``auto`` when tools are given, else ``none`` (as OpenAI does).
        """
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named", choice.function.name
        if choice is None:
            return ("auto" if self.tools else "none"), None
        if not self.tools:
            return "none", None
        return choice, None

    @property
    def constrained(self) -> bool:
        """Whether the reply is decoded under a grammar: a forced tool call, or a JSON ``response_format``."""
        forced = self.tool_mode()[0] in ("required", "named")
        return forced or (self.response_format is not None and self.response_format.type != "text")

    def conversation(self) -> dict[str, Any]:
        """The request as the engine's conversation: ``{"messages": [...], "tools": [...]}``.

        ``developer`` becomes ``system``; text parts are joined; tools are left out when the mode is ``none``
        (the model is not told about tools it may not call).
        """
        messages = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                    for c in m.tool_calls
                ]
            if m.role == "tool":
                msg["tool_call_id"] = m.tool_call_id
                if m.name:
                    msg["name"] = m.name
            messages.append(msg)
        mode, _ = self.tool_mode()
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []] if mode != "none" else []
        return {"messages": messages, "tools": tools}


# ------------------------------------------------------------------------------------------ checks


def _schema_error(parameters: dict[str, Any]) -> str | None:
    if parameters.get("type", "object") != "object":
        return f"must describe an object (\"type\": \"object\"), got type {parameters.get('type')!r}"
    from jsonschema import exceptions, validators

    cls = validators.validator_for(parameters, default=validators.Draft202012Validator)
    try:
        cls.check_schema(parameters)
    except exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        return f"is not valid JSON Schema at {where}: {exc.message}"
    return None


def check_request(req: ChatCompletionRequest) -> None:
    """Refuse what the schema alone cannot: bad tool definitions, tool choices, message order, arguments.

    Raises :class:`APIError` (400) with the offending ``param`` and a message that says how to fix it.
    """
    for name, allowed in UNSUPPORTED.items():
        value = (req.model_extra or {}).get(name)
        if value not in allowed:
            raise APIError(400, "unsupported_parameter",
                           f"'{name}' is not supported by this service; leave it out", param=name)
    if req.n not in (None, 1):
        raise APIError(400, "unsupported_parameter", "only n=1 is supported; send n separate requests", param="n")

    names: list[str] = []
    for i, tool in enumerate(req.tools or []):
        name = tool.function.name
        if not FUNCTION_NAME.match(name):
            raise APIError(400, "invalid_tool_schema",
                           f"function name {name!r} is invalid: use 1-64 letters, digits, '_', '-' or '.'",
                           param=f"tools[{i}].function.name")
        if name in names:
            raise APIError(400, "invalid_tool_schema", f"function '{name}' is defined twice in 'tools'; keep one",
                           param=f"tools[{i}].function.name")
        names.append(name)
        if tool.function.parameters is not None:
            error = _schema_error(tool.function.parameters)
            if error:
                raise APIError(400, "invalid_tool_schema",
                               f"the parameters of function '{name}' {error}; give a JSON Schema object such as "
                               "{\"type\": \"object\", \"properties\": {...}}",
                               param=f"tools[{i}].function.parameters")

    if isinstance(req.tool_choice, NamedToolChoice):
        if req.tool_choice.function.name not in names:
            raise APIError(400, "invalid_tool_choice",
                           f"tool_choice names function '{req.tool_choice.function.name}', which 'tools' does not "
                           f"define (defined: {', '.join(names) or 'none'})", param="tool_choice")
    elif req.tool_choice == "required" and not names:
        raise APIError(400, "invalid_tool_choice", "tool_choice 'required' needs at least one function in 'tools'",
                       param="tool_choice")

    _check_response_format(req)

    open_calls: set[str] = set()
    for k, msg in enumerate(req.messages):
        where = f"messages[{k}]"
        if msg.role == "assistant":
            if not (msg.text() or "").strip() and not msg.tool_calls:
                raise APIError(400, "invalid_request", f"{where} is an assistant message with neither content nor "
                               "tool_calls", param=where)
            for c, call in enumerate(msg.tool_calls or []):
                try:
                    args = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    raise APIError(400, "invalid_arguments_json",
                                   f"{where}.tool_calls[{c}].function.arguments must be a JSON object encoded as a "
                                   "string, such as '{\"city\": \"Paris\"}'",
                                   param=f"{where}.tool_calls[{c}].function.arguments")
                open_calls.add(call.id)
        elif msg.role == "tool":
            if not msg.tool_call_id:
                raise APIError(400, "invalid_request", f"{where} (role 'tool') needs 'tool_call_id'",
                               param=f"{where}.tool_call_id")
            if msg.tool_call_id not in open_calls:
                raise APIError(400, "invalid_request",
                               f"{where} answers tool call '{msg.tool_call_id}', but no earlier assistant message made "
                               "a call with that id; a 'tool' message must follow the assistant message whose "
                               "'tool_calls' it answers", param=f"{where}.tool_call_id")
            if msg.content is None:
                raise APIError(400, "invalid_request", f"{where} (role 'tool') needs the result in 'content'",
                               param=f"{where}.content")
        elif msg.content is None:
            raise APIError(400, "invalid_request", f"{where} (role '{msg.role}') needs 'content'",
                           param=f"{where}.content")


def _check_response_format(req: ChatCompletionRequest) -> None:
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema":
        spec = fmt.json_schema
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "invalid_response_format", "response_format of type 'json_schema' needs "
                           "'json_schema': {\"name\": ..., \"schema\": {...}} with the JSON Schema as an object",
                           param="response_format.json_schema.schema")
        from jsonschema import exceptions, validators

        schema = spec["schema"]
        try:
            validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
        except exceptions.SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
            raise APIError(400, "invalid_response_format", f"response_format.json_schema.schema is not valid JSON "
                           f"Schema at {where}: {exc.message}", param="response_format.json_schema.schema") from exc
    if req.constrained and req.stop_list:
        # Under a grammar the grammar decides where the reply ends; a stop string could only cut it invalid.
        raise APIError(400, "unsupported_parameter", "'stop' cannot be combined with a JSON response_format or a "
                       "forced tool call (tool_choice 'required' or a named function): the reply ends where the "
                       "JSON or the call ends; leave 'stop' out", param="stop")


def inference_token() -> str | None:
    """``CITI_INFERENCE_TOKEN``, read through the service settings (the environment, or ``.env``): the secret the
    API presents and the inference server requires; None when it is not configured."""
    token = get_settings().inference_token
    return token.get_secret_value() if token is not None and token.get_secret_value() else None
