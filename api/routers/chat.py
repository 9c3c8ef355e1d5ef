"""``POST /v1/chat/completions``: OpenAI's chat API, answered by the inference server.

The API process validates the request (no torch here), checks that the caller may use the model,
and forwards it to the inference server at ``CITI_INFERENCE_URL``, streaming its answer back
unchanged (SSE when ``stream`` is true). ``model`` is a base model spec this service allows or the
``fine_tuned_model`` id of one of the caller's succeeded jobs; the API adds ``citi_adapter`` (the
model id, its job id and base model) so the inference server never needs the job store or the
caller's key: it finds the adapter in the artifact store by the job id.

The request schema and :func:`check_request` are shared with the inference server
(``worker/inference.py``), so a request is judged the same wherever it arrives. Checks that need the
tokenizer (prompt plus ``max_tokens`` over the context length) happen there; its 400 passes through.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.deps import get_store, get_tenant, settings_dep
from api.errors import APIError, error_body
from api.routers.models import base_model_allowed, model_not_found
from api.settings import Settings
from api.store import Store

log = logging.getLogger("citi.api.chat")

router = APIRouter(tags=["chat"])

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


# ------------------------------------------------------------------------------------------ schema


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
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
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


# ------------------------------------------------------------------------------------------ proxy


def inference_token() -> str | None:
    """``CITI_INFERENCE_TOKEN``: a shared secret the inference server asks for, when set."""
    return os.environ.get("CITI_INFERENCE_TOKEN") or None


def _unavailable(url: str | None, why: str) -> APIError:
    where = f"at {url} " if url else ""
    return APIError(503, "inference_unavailable",
                    f"the inference server {where}{why}; start it with `uvicorn worker.inference:app` and point "
                    "CITI_INFERENCE_URL at it", headers={"Retry-After": "5"})


def _timeout() -> httpx.Timeout:
    # Generation on a CPU host can take minutes before the last byte; connecting must be quick.
    read = float(os.environ.get("CITI_INFERENCE_TIMEOUT_S", "600"))
    return httpx.Timeout(connect=5.0, read=read, write=30.0, pool=5.0)


def _passthrough_error(status: int, raw: bytes) -> JSONResponse:
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or "error" not in body:
            raise ValueError
    except ValueError:
        body = error_body(502, "inference_error", f"the inference server answered {status} without an error body")
        status = 502
    return JSONResponse(body, status_code=status)


async def _relay(response: httpx.Response, client: httpx.AsyncClient) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:  # the inference server went away mid-stream: say so in the stream
        log.warning("inference stream broke off: %s", exc)
        err = error_body(502, "inference_error", "the inference server stopped answering mid-stream")
        yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
    finally:
        await response.aclose()
        await client.aclose()


@router.post("/v1/chat/completions", summary="Chat completion with tool calls (OpenAI-compatible)")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    settings: Settings = Depends(settings_dep),
):
    """Answer a conversation with a base model or one of the caller's fine-tuned models, streamed or not."""
    if body.citi_adapter is not None:
        raise APIError(400, "unsupported_parameter", "'citi_adapter' is set by the service itself; leave it out",
                       param="citi_adapter")
    check_request(body)
    payload = body.model_dump(exclude_none=True)
    job = store.get_job_by_model(tenant, body.model)
    if job is not None:
        payload["citi_adapter"] = {"id": body.model, "job_id": job["id"], "base_model": job.get("model")}
    elif not base_model_allowed(body.model, settings):
        raise model_not_found(body.model)

    url = settings.inference_url
    if not url:
        raise _unavailable(None, "is not configured (CITI_INFERENCE_URL is unset)")
    headers = {"X-Request-ID": request.headers.get("x-request-id", "")}
    if inference_token():
        headers["Authorization"] = f"Bearer {inference_token()}"
    client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=_timeout())
    try:
        upstream = await client.send(client.build_request("POST", "/v1/chat/completions", json=payload,
                                                          headers=headers), stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise _unavailable(url, f"does not answer ({exc.__class__.__name__})") from exc
    if upstream.status_code != 200 or not body.stream:
        try:
            raw = await upstream.aread()
        finally:
            await upstream.aclose()
            await client.aclose()
        if upstream.status_code != 200:
            return _passthrough_error(upstream.status_code, raw)
        return JSONResponse(json.loads(raw))
    return StreamingResponse(_relay(upstream, client), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
