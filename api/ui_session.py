"""Browser sessions for the dashboard: a signed, expiring cookie in place of the bearer header.

Browsers cannot put ``Authorization: Bearer`` on page loads, download links or ``EventSource``, so
``POST /ui/session`` exchanges an API key for a session token kept in an HttpOnly, SameSite=Strict
cookie. The API accepts that cookie wherever it accepts a key (``api.deps.set_session_resolver``), with
the same tenant rules; a request that carries a bearer header is judged by the header alone.

Token: ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))`` with the payload
``{"v": 1, "t": tenant, "exp": unix time, "n": random nonce}``. Nothing about the key is in it.

Secret: ``HMAC(CITI_SESSION_SECRET, "citi-ui-session\\0" + CITI_API_KEYS)``. Every API process and
replica with the same configuration accepts the same sessions, and any change to the key list (a key
revoked or rotated) signs every session out, so a removed key cannot live on in a cookie. Without
``CITI_SESSION_SECRET`` the secret still derives from the whole key list, which no single tenant knows
unless it is the only one (and then a forged session reaches only its own resources).

CSRF: the cookie is SameSite=Strict, and every state-changing request it authenticates must also send
``X-CSRF-Token`` with the session's CSRF token, ``HMAC(secret, "csrf\\0" + nonce)``, which the page
reads from ``GET /ui/session`` (a same-origin read another site cannot make). Signing out revokes the
nonce in Redis until the token would have expired anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache

from fastapi import Request, Response
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from citi_service.errors import APIError
from citi_service.store import Store

SESSION_COOKIE = "citi_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_VERSION = 1
_MAX_TOKEN_CHARS = 1024


class SessionSettings(BaseSettings):
    """Settings of dashboard sessions (environment variables ``CITI_SESSION_*``)."""

    model_config = SettingsConfigDict(env_prefix="CITI_", env_file=".env", extra="ignore")

    session_secret: SecretStr | None = Field(
        None, description="CITI_SESSION_SECRET: extra secret for signing dashboard sessions (recommended; without "
        "it the signing key derives from CITI_API_KEYS alone).")
    session_ttl_seconds: int = Field(
        8 * 3600, gt=0, description="CITI_SESSION_TTL_SECONDS: how long a dashboard sign-in lasts.")
    session_cookie_secure: bool | None = Field(
        None, description="CITI_SESSION_COOKIE_SECURE: mark the cookie Secure (HTTPS only). Unset: when the "
        "request came over HTTPS (X-Forwarded-Proto counts only behind a proxy that sets it).")


@lru_cache(maxsize=1)
def get_session_settings() -> SessionSettings:
    """The process's session settings, read once."""
    return SessionSettings()


@lru_cache(maxsize=1)
def signing_secret() -> bytes:
    """The key sessions are signed with (see the module docstring for how it is derived)."""
    from citi_service.settings import get_settings

    extra = get_session_settings().session_secret
    key = extra.get_secret_value().encode() if extra is not None else b""
    return hmac.new(key, b"citi-ui-session\0" + get_settings().api_keys.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Session:
    """A verified dashboard session."""

    tenant: str
    expires_at: int
    nonce: str

    def csrf_token(self, secret: bytes | None = None) -> str:
        """The token state-changing requests of this session must send in ``X-CSRF-Token``."""
        mac = hmac.new(secret or signing_secret(), b"csrf\0" + self.nonce.encode(), hashlib.sha256).digest()
        return _b64(mac)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(payload: bytes, secret: bytes) -> str:
    return _b64(hmac.new(secret, payload, hashlib.sha256).digest())


def create_session(tenant: str, *, ttl_seconds: int | None = None, secret: bytes | None = None,
                   now: float | None = None) -> tuple[str, Session]:
    """A new session for ``tenant``: ``(token for the cookie, session)``."""
    ttl = ttl_seconds if ttl_seconds is not None else get_session_settings().session_ttl_seconds
    session = Session(tenant=tenant, expires_at=int((time.time() if now is None else now) + ttl),
                      nonce=secrets.token_urlsafe(16))
    payload = json.dumps({"v": TOKEN_VERSION, "t": session.tenant, "exp": session.expires_at, "n": session.nonce},
                         separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_sign(payload, secret or signing_secret())}", session


def verify_session(token: str | None, *, secret: bytes | None = None, now: float | None = None) -> Session | None:
    """The session a token stands for, or None when it is malformed, forged or expired (revocation is
    checked separately, by :func:`is_revoked`)."""
    if not token or len(token) > _MAX_TOKEN_CHARS or token.count(".") != 1:
        return None
    body, mac = token.split(".")
    try:
        payload = _unb64(body)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(_sign(payload, secret or signing_secret()), mac):
        return None
    try:
        data = json.loads(payload)
        session = Session(tenant=str(data["t"]), expires_at=int(data["exp"]), nonce=str(data["n"]))
        version = data["v"]
    except (ValueError, KeyError, TypeError):
        return None
    if version != TOKEN_VERSION or not session.tenant or not session.nonce:
        return None
    if session.expires_at <= (time.time() if now is None else now):
        return None
    return session


# -- revocation (sign-out) -------------------------------------------------------------------------


def revoke(session: Session, store: Store) -> None:
    """Refuse this session from now on (until it would have expired anyway)."""
    ttl = max(1, session.expires_at - int(time.time()))
    store.r.set(store.k("ui", "revoked", session.nonce), "1", ex=ttl)


def is_revoked(session: Session, store: Store) -> bool:
    """Whether the session was signed out."""
    return bool(store.r.exists(store.k("ui", "revoked", session.nonce)))


# -- requests --------------------------------------------------------------------------------------


def session_from_request(request: Request, store: Store | None = None) -> Session | None:
    """The valid, not signed-out session the request's cookie carries, or None."""
    session = verify_session(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    if store is None:
        from api.deps import get_store

        store = get_store()
    return None if is_revoked(session, store) else session


def check_csrf(request: Request, session: Session) -> None:
    """Refuse a state-changing request whose ``X-CSRF-Token`` header does not match its session (403)."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), session.csrf_token().encode()):
        raise APIError(403, "csrf_token_invalid",
                       f"this request is authenticated by the dashboard session cookie, so it must send the "
                       f"session's CSRF token in the {CSRF_HEADER} header (read it from GET /ui/session); "
                       "API clients should send 'Authorization: Bearer <key>' instead", param=CSRF_HEADER)


def resolve_session(request: Request) -> str | None:
    """The tenant of the request's session cookie, or None; for ``api.deps.set_session_resolver``.

    State-changing requests must carry the session's CSRF token (else 403).
    """
    session = session_from_request(request)
    if session is None:
        return None
    check_csrf(request, session)
    return session.tenant


def cookie_secure(request: Request) -> bool:
    """Whether to mark the cookie Secure: the setting, else whether the request came over HTTPS."""
    configured = get_session_settings().session_cookie_secure
    if configured is not None:
        return configured
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def set_session_cookie(response: Response, request: Request, token: str, session: Session) -> None:
    """Put the session token in an HttpOnly, SameSite=Strict cookie that lasts as long as the session."""
    response.set_cookie(SESSION_COOKIE, token, max_age=max(0, session.expires_at - int(time.time())),
                        path="/", httponly=True, samesite="strict", secure=cookie_secure(request))


def clear_session_cookie(response: Response, request: Request) -> None:
    """Remove the session cookie from the browser."""
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=cookie_secure(request))
