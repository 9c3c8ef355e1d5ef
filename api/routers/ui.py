"""The dashboard at ``/ui``: its pages, its sign-in session and the few reads its pages need.

The pages are one static HTML shell with small ES modules (``api/ui/``, no build step); they talk to the
same API as every other client, authenticated by the session cookie (see :mod:`api.ui_session`).
The shell is public (it shows the sign-in form); every piece of data behind it needs a session or a key.

Routes:
- ``GET /ui``, ``/ui/jobs``, ``/ui/jobs/{id}``, ``/ui/new``, ``/ui/chat``: the page shell.
- ``GET /ui/assets/{path}``: its scripts, styles and vendored chart library.
- ``POST /ui/session`` (``{"key": ...}``) signs in; ``GET /ui/session`` says who is signed in and gives the
  CSRF token; ``DELETE /ui/session`` signs out.
- ``GET /ui/api/options``: the choices and defaults of the new-job form (from the engine's config).
- ``GET /ui/api/jobs/{id}/importance``: the job's ``importance.json``, from the finished adapter or, while
  the job runs, from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import check_key, get_storage, get_store, get_tenant, settings_dep
from api.schemas import ErrorResponse
from api.ui_session import (
    CSRF_HEADER,
    check_csrf,
    clear_session_cookie,
    create_session,
    revoke,
    session_from_request,
    set_session_cookie,
)
from citi_service.errors import APIError, not_found
from citi_service.keys import adapter_prefix, checkpoints_prefix, work_checkpoints_dir
from citi_service.records import TERMINAL
from citi_service.settings import Settings
from citi_service.storage import Storage
from citi_service.store import Store

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
PAGES = ("/ui", "/ui/", "/ui/jobs", "/ui/jobs/{job_id}", "/ui/new", "/ui/chat")
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}

router = APIRouter(tags=["dashboard"])


class SignIn(BaseModel):
    """Body of ``POST /ui/session``."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(..., min_length=1, max_length=4096, description="An API key (as in CITI_API_KEYS).")


class SessionInfo(BaseModel):
    """Who is signed in, and the token state-changing requests must send in ``X-CSRF-Token``."""

    tenant: str
    expires_at: int
    csrf_token: str
    csrf_header: str = CSRF_HEADER


# -- pages -----------------------------------------------------------------------------------------


def _page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


for _path in PAGES:
    router.add_api_route(_path, _page, methods=["GET"], include_in_schema=False, response_class=FileResponse)


@router.get("/ui/assets/{path:path}", include_in_schema=False)
def asset(path: str) -> FileResponse:
    """A file of the front end (scripts, styles, the vendored chart library)."""
    target = (UI_DIR / path).resolve()
    media_type = ASSET_TYPES.get(target.suffix)
    if not target.is_relative_to(UI_DIR) or media_type is None or not target.is_file():
        raise APIError(404, "not_found", f"no dashboard file '{path}'")
    return FileResponse(target, media_type=media_type,
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


# -- session ---------------------------------------------------------------------------------------


@router.post("/ui/session", response_model=SessionInfo, responses={**_ERRORS, 403: {"model": ErrorResponse}})
def sign_in(body: SignIn, request: Request, response: Response, store: Store = Depends(get_store)) -> SessionInfo:
    """Exchange an API key for a dashboard session cookie (HttpOnly, SameSite=Strict)."""
    # Only same-origin pages may sign in, so another site cannot sign a visitor into its own account.
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise APIError(403, "cross_site_request", "sign in from the dashboard page itself (/ui)")
    tenant = check_key(request, store, body.key.strip())
    if tenant is None:
        raise APIError(401, "invalid_api_key", "that API key is not valid; check it (CITI_API_KEYS lists the keys "
                       "this server accepts) and try again", param="key")
    token, session = create_session(tenant)
    set_session_cookie(response, request, token, session)
    response.headers["Cache-Control"] = "no-store"
    return SessionInfo(tenant=tenant, expires_at=session.expires_at, csrf_token=session.csrf_token())


@router.get("/ui/session", response_model=SessionInfo, responses=_ERRORS)
def current_session(request: Request, response: Response, store: Store = Depends(get_store)) -> SessionInfo:
    """The signed-in tenant and the session's CSRF token (401 when not signed in)."""
    session = session_from_request(request, store)
    if session is None:
        raise APIError(401, "not_signed_in", "not signed in, or the session has ended: sign in at /ui with an API key")
    response.headers["Cache-Control"] = "no-store"
    return SessionInfo(tenant=session.tenant, expires_at=session.expires_at, csrf_token=session.csrf_token())


@router.delete("/ui/session", status_code=204, responses={403: {"model": ErrorResponse}})
def sign_out(request: Request, store: Store = Depends(get_store)) -> Response:
    """Sign out: the session is revoked and its cookie removed."""
    session = session_from_request(request, store)
    if session is not None:
        check_csrf(request, session)  # else another page could sign the visitor out
        revoke(session, store)
    response = Response(status_code=204)
    clear_session_cookie(response, request)
    return response


# -- what the pages read ---------------------------------------------------------------------------


def _fields(cls) -> list[dict[str, Any]]:
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append({"name": f.name, "default": default, "help": f.metadata.get("help", "")})
    return out


@router.get("/ui/api/options", responses=_ERRORS)
def form_options(tenant: str = Depends(get_tenant)) -> dict:
    """Methods, and each budget, component and hyperparameter field with its default and help text."""
    from citi_engine.training.config import METHODS, Budget, ComponentsConfig, Hyperparameters

    return {"methods": list(METHODS), "budget": _fields(Budget), "components": _fields(ComponentsConfig),
            "hyperparameters": _fields(Hyperparameters)}


def _latest_checkpoint_importance(job_id: str, storage: Storage, settings: Settings) -> bytes | None:
    """``importance.json`` from a running job's checkpoints: in the bucket (S3 workers copy them there) or in
    the job's working directory under the artifact dir (local workers; see :mod:`citi_service.keys`)."""
    found = [o.key for o in storage.list(checkpoints_prefix(job_id)) if o.key.endswith("/importance.json")]
    if found:
        try:
            return storage.get_bytes(sorted(found)[-1])
        except FileNotFoundError:
            pass  # pruned meanwhile; the working directory may still have one
    if settings.storage == "local":
        root = work_checkpoints_dir(settings, job_id)
        for path in sorted(root.glob("*/importance.json")):
            if path.parent.name.startswith("."):
                continue  # a checkpoint being written or replaced
            try:
                return path.read_bytes()
            except OSError:
                continue  # replaced by a newer checkpoint while we looked
    return None


@router.get("/ui/api/jobs/{job_id}/importance", responses={**_ERRORS, 409: {"model": ErrorResponse}})
def job_importance(
    job_id: str,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
    settings: Settings = Depends(settings_dep),
) -> JSONResponse:
    """The job's component importance and the chosen MOLoRA and UCO components (``importance.json``)."""
    job = store.get_job_for(tenant, job_id)
    if job is None:
        raise not_found("job", job_id, "job_id")
    data = None
    finished = job["status"] in TERMINAL
    if job["status"] == "succeeded" and not job.get("artifacts_deleted"):
        key = adapter_prefix(job_id) + "importance.json"
        data = storage.get_bytes(key) if storage.exists(key) else None
    elif not finished:
        data = _latest_checkpoint_importance(job_id, storage, settings)
    if data is None:
        if (job.get("method") or {}).get("type", "citi") != "citi":
            why = "only the citi method scores component importance"
        elif finished:
            why = "the job ended without importance scores (or its artifacts were deleted)"
        else:
            why = "it is scored once the data and model are loaded, and appears with the first checkpoint after that"
        raise APIError(409, "importance_not_available", f"no importance.json for job {job_id} yet: {why}",
                       param="job_id")
    return JSONResponse(json.loads(data), headers={"Cache-Control": "no-store"})

