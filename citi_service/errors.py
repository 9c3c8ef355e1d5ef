"""Errors in OpenAI's shape: ``{"error": {"code", "param", "message", "type"}}`` (plus ``details`` where useful).

Every error a user can cause is raised as :class:`APIError` with a machine-readable ``code`` and a message
that says how to fix it. FastAPI's own request validation errors (422) are answered as 400 in the same
shape, and anything unexpected becomes a logged 500 that reveals nothing internal.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("citi.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_type(status: int) -> str:
    """The OpenAI-style ``type`` for an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str, param: str | None = None, details: list | None = None) -> dict:
    """The JSON body of an error response."""
    err: dict[str, Any] = {"code": code, "param": param, "message": message, "type": error_type(status)}
    if details is not None:
        err["details"] = details
    return {"error": err}


class APIError(StarletteHTTPException):
    """An error answered as ``status`` with the OpenAI error body.

    It subclasses Starlette's HTTPException so FastAPI re-raises it untouched even from inside body
    parsing (the upload size limit relies on that).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        details: list | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.param = param
        self.details = details

    def response(self) -> JSONResponse:
        """This error as a response."""
        return JSONResponse(
            error_body(self.status_code, self.code, self.message, self.param, self.details),
            status_code=self.status_code,
            headers=self.headers,
        )


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    """404 for a resource that does not exist or belongs to another tenant (the two are indistinguishable)."""
    return APIError(404, f"{kind}_not_found", f"no {kind} with id '{ident}' (check the id and the API key you use)",
                    param=param)


def _loc_to_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or (str(loc[0]) if loc else None)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        # FastAPI reports where in the text it stopped as the location; that is not a parameter.
        loc = bad_json.get("loc", ())
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        why = (bad_json.get("ctx") or {}).get("error") or bad_json.get("msg", "")
        message = f"the request body is not valid JSON{where} ({why}); send a JSON object"
        return JSONResponse(error_body(400, "invalid_json", message, "body"), status_code=400)
    details = []
    for e in errors:
        details.append({"param": _loc_to_param(e.get("loc", ())), "code": e.get("type", "invalid"),
                        "message": e.get("msg", "invalid value")})
    first = details[0] if details else {"param": None, "code": "invalid", "message": "invalid request"}
    extra = f" (and {len(details) - 1} more problem(s), see details)" if len(details) > 1 else ""
    message = f"{first['param']}: {first['message']}{extra}" if first["param"] else first["message"] + extra
    return JSONResponse(
        error_body(400, "invalid_request", message, first["param"], details),
        status_code=400,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse(
            error_body(exc.status_code, codes.get(exc.status_code, "http_error"), message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RedisError)
    async def _store_down(request: Request, exc: RedisError) -> JSONResponse:
        # The store is down or restarting: nothing the caller did wrong, and retrying shortly will work.
        log.warning("job store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            error_body(503, "service_unavailable", "the job store (Redis) is unavailable; retry in a few seconds"),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Answered outside the app's middleware, so the request id (the API's RequestIdMiddleware) is added here.
        request_id = (request.scope.get("state") or {}).get("request_id")
        log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
        return JSONResponse(
            error_body(500, "internal_error", "internal server error; the service logged the details"),
            status_code=500,
            headers={"x-request-id": request_id} if request_id else None,
        )
