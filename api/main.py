"""The FastAPI application: ``uvicorn api.main:app``.

Assembled here from one router per resource (the job routes twice: at ``/jobs`` and at OpenAI's
``/v1/fine_tuning/jobs``). The API never imports torch: it validates with the engine's torch-free
modules and leaves everything that needs a model to the workers, reached through the queue and the
store of :mod:`citi_service`.
"""

from __future__ import annotations

import logging
import re
import secrets

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api import metrics
from api.deps import get_store, set_session_resolver
from api.routers import chat, files, health, jobs, models, ui
from api.ui_session import resolve_session
from citi_engine import __version__
from citi_service.errors import APIError, error_body, install_error_handlers
from citi_service.settings import get_settings

log = logging.getLogger("citi.api")

UPLOAD_PATHS = ("/v1/files",)
MULTIPART_OVERHEAD = 64 * 1024
_REQUEST_ID = re.compile(rb"[A-Za-z0-9_.:\-]{1,128}")

DESCRIPTION = """Fine-tune chat models to call tools without forgetting the rest (CITI: importance-guided
MOLoRA + UCO). Upload JSONL with `POST /v1/files`, create a job with `POST /jobs` (or OpenAI's
`POST /v1/fine_tuning/jobs`), follow it with `GET /jobs/{id}/events` (SSE with `Accept: text/event-stream`)
and download the adapter from `GET /jobs/{id}/adapter`. Every route that reads or changes data needs
`Authorization: Bearer <key>`; public are `/healthz`, this description (`/openapi.json`, `/docs`) and the
dashboard's sign-in. Errors use OpenAI's shape `{"error": {"code", "param", "message", "type"}}`."""


class BodyLimitMiddleware:
    """Refuse request bodies over the limits with a 413 before they are read in full.

    Uploads may be ``CITI_MAX_UPLOAD_BYTES`` (plus multipart framing); other bodies ``CITI_MAX_REQUEST_BYTES``.
    A declared Content-Length over the limit is answered at once; a body that turns out longer stops
    being read when it crosses the limit.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        upload = scope["path"].rstrip("/") in UPLOAD_PATHS
        limit = settings.max_upload_bytes + MULTIPART_OVERHEAD if upload else settings.max_request_bytes
        what = (f"uploads may be {settings.max_upload_bytes} bytes at most (CITI_MAX_UPLOAD_BYTES)" if upload
                else f"request bodies may be {settings.max_request_bytes} bytes at most")
        error = APIError(413, "file_too_large" if upload else "request_too_large",
                         f"the request is too large: {what}; split the file", param="file" if upload else None)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error.response()(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise error
            return message

        await self.app(scope, limited_receive, send)


class RequestIdMiddleware:
    """An ``x-request-id`` header on every response (as OpenAI's API sends): the client's own when it sent a sane
    one (1-128 letters, digits and ``-_.:``), else a new ``req_<32 hex>``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        request_id = sent if _REQUEST_ID.fullmatch(sent) else b"req_" + secrets.token_hex(16).encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, told the truth: validation errors are 400 in our error shape (never 422), every
    route but the health check needs a bearer key and may answer 401."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from api.schemas import ErrorResponse

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"))
    for name, sub in ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs",
                                                                                                     {}).items():
        schemas.setdefault(name, sub)
    schemas.get("ErrorResponse", {}).pop("$defs", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Invalid request", **error})
            if path != "/healthz":
                op["security"] = [{"bearer": []}]
                responses.setdefault("401", {"description": "Missing or invalid API key", **error})
    app.openapi_schema = schema
    return schema


def create_app() -> FastAPI:
    """Build the application (settings are read from the environment)."""
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(
        title="citi",
        version=__version__,
        description=DESCRIPTION,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(jobs.router, prefix="/jobs", tags=["jobs"])
    app.include_router(jobs.router, prefix="/v1/fine_tuning/jobs", tags=["fine_tuning (OpenAI paths)"])
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(ui.router)
    set_session_resolver(resolve_session)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(metrics.LatencyMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost of ours: errors and 413s carry it too
    metrics.install_store_collector(get_store)
    app.openapi = lambda: _openapi(app)
    log.info("citi API %s: storage=%s, %d key(s) configured", __version__, settings.storage,
             len(settings.api_keys_list))
    return app


app = create_app()

__all__ = ["app", "create_app", "error_body"]
