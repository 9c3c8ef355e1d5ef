"""``POST /v1/chat/completions``: OpenAI's chat API, answered by the inference server.

The API process validates the request (no torch here), checks that the caller may use the model,
and forwards it to the inference server at ``CITI_INFERENCE_URL``, streaming its answer back
unchanged (SSE when ``stream`` is true). ``model`` is a base model spec this service allows or the
``fine_tuned_model`` id of one of the caller's succeeded jobs; the API adds ``citi_adapter`` (the
model id, its job id and base model) so the inference server never needs the job store or the
caller's key: it finds the adapter in the artifact store by the job id.

The request schema and :func:`~citi_service.chat.check_request` live in :mod:`citi_service.chat`, shared
with the inference server, so a request is judged the same wherever it arrives. Checks that need the
tokenizer (prompt plus ``max_tokens`` over the context length) happen there; its 400 passes through.

``response_format`` (``json_object``, ``json_schema``) and forced tool calls are enforced by constrained
decoding on the inference server (see :mod:`worker.inference.app`). This process checks only that a
``json_schema`` is valid JSON Schema; whether the grammar library can compile it is the inference
server's 400 (``invalid_response_format`` / ``invalid_tool_schema``, with the schema's ``param``), passed
through. Neither torch nor the grammar library is imported here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import get_store, get_tenant, settings_dep
from api.model_access import model_not_found
from citi_service.chat import ChatCompletionRequest, check_request, inference_token
from citi_service.errors import APIError, error_body
from citi_service.model_access import base_model_allowed
from citi_service.settings import Settings
from citi_service.store import Store

log = logging.getLogger("citi.api.chat")

router = APIRouter(tags=["chat"])

def _unavailable(url: str | None, why: str) -> APIError:
    where = f"at {url} " if url else ""
    return APIError(503, "inference_unavailable",
                    f"the inference server {where}{why}; start it with `uvicorn worker.inference.app:app` and point "
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
    token = inference_token()
    if token is None:
        raise _unavailable(url, "cannot be called: CITI_INFERENCE_TOKEN is not set for the API (set the same secret "
                           "for the API and the inference server, in .env)")
    headers = {"X-Request-ID": request.headers.get("x-request-id", ""), "Authorization": f"Bearer {token}"}
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
        if upstream.status_code == 401:  # the caller's key was fine: the two servers disagree on the token
            log.error("the inference server at %s refused the API's CITI_INFERENCE_TOKEN", url)
            raise _unavailable(url, "refused the API's CITI_INFERENCE_TOKEN (the two must be set to the same "
                               "secret)")
        if upstream.status_code != 200:
            return _passthrough_error(upstream.status_code, raw)
        return JSONResponse(json.loads(raw))
    return StreamingResponse(_relay(upstream, client), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
