"""Shared dependencies: settings, the store, storage, and authentication.

Keys come from ``CITI_API_KEYS`` (``tenant:key`` or a bare key, which is its own tenant). They are held
only as SHA-256 digests in memory and compared in constant time; neither a key nor its digest is ever
written to the store or a log. Resources belong to the tenant, so a tenant can rotate its keys.

Routers use ``Depends(get_tenant)`` (the caller's tenant id) and ``Depends(get_store)``. A browser
session (the dashboard) can authenticate through :func:`set_session_resolver`, which plugs a cookie
check in after the bearer header.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from functools import lru_cache

from fastapi import Depends, Request

from citi_service.errors import APIError
from citi_service.settings import Settings, get_settings
from citi_service.storage import Storage, make_storage
from citi_service.store import Store


class KeyRing:
    """API keys as digests, mapped to their tenants."""

    def __init__(self, entries: list[str]):
        self._digests: list[tuple[bytes, str]] = []
        for entry in entries:
            tenant, sep, key = entry.partition(":")
            if not sep:
                key = tenant
                # A bare key is its own tenant; its id derives from the digest so the key itself is never stored.
                tenant = "key-" + hashlib.sha256(("tenant:" + key).encode()).hexdigest()[:16]
            if not key or not tenant:
                raise ValueError("CITI_API_KEYS has an empty key or tenant; use 'tenant:key' or 'key', comma-separated")
            self._digests.append((hashlib.sha256(key.encode()).digest(), tenant))

    def __len__(self) -> int:
        return len(self._digests)

    def tenant_for(self, key: str) -> str | None:
        """The tenant of ``key``, or None. Looks at every entry whatever matches, so timing reveals nothing."""
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(presented, digest) and found is None:
                found = tenant
        return found


@lru_cache(maxsize=1)
def get_keyring() -> KeyRing:
    """The key ring built from the settings, once per process."""
    return KeyRing(get_settings().api_keys_list)


@lru_cache(maxsize=1)
def _store() -> Store:
    settings = get_settings()
    # Each admitted event stream holds at most one asyncio connection; the rest is headroom.
    return Store(settings.redis_url, async_connections=settings.max_streams_per_process + 16)


@lru_cache(maxsize=1)
def _storage() -> Storage:
    return make_storage(get_settings())


def get_store() -> Store:
    """The process's store (one Redis connection pool)."""
    return _store()


def get_storage() -> Storage:
    """The process's artifact storage."""
    return _storage()


def settings_dep() -> Settings:
    """The settings, as a dependency."""
    return get_settings()


SessionResolver = Callable[[Request], "str | None"]
_session_resolver: SessionResolver | None = None


def set_session_resolver(resolver: SessionResolver | None) -> None:
    """Accept a second way in (e.g. a dashboard session cookie): ``resolver(request)`` returns the tenant
    or None. It is asked only when the request carries no bearer key. State-changing requests that it
    authenticates must be CSRF-checked by the resolver itself."""
    global _session_resolver
    _session_resolver = resolver


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise APIError(401, "invalid_authorization",
                       "the Authorization header must be 'Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    return value.strip()


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def check_key(request: Request, store: Store, key: str) -> str | None:
    """The tenant of ``key``, or None for a wrong key (counted against the client's address). A client
    address past ``CITI_AUTH_FAILURES_PER_MINUTE`` wrong keys gets 429 for any key until the minute is over,
    so keys cannot be guessed at speed. Used by the bearer check and the dashboard's sign-in."""
    limit = get_settings().auth_failures_per_minute
    if limit and store.auth_failures(_address(request)) >= limit:
        retry = max(1, 60 - int(time.time()) % 60)
        raise APIError(429, "too_many_failed_authentications",
                       f"more than {limit} wrong keys from this address in a minute; retry in {retry} s with a "
                       "valid key", headers={"Retry-After": str(retry)})
    tenant = get_keyring().tenant_for(key)
    if tenant is None and limit:
        store.add_auth_failure(_address(request))
    return tenant


def get_tenant(request: Request, store: Store = Depends(get_store)) -> str:
    """Authenticate the request and return its tenant id (401 without a valid key; 429 over the rate limit or
    after too many wrong keys from the client's address)."""
    key = _bearer(request)
    tenant = None
    if key is not None:
        tenant = check_key(request, store, key)
        if tenant is None:
            raise APIError(401, "invalid_api_key", "the API key is not valid; check CITI_API_KEY or ask for a key",
                           headers={"WWW-Authenticate": "Bearer"})
    elif _session_resolver is not None:
        tenant = _session_resolver(request)
    if tenant is None:
        hint = "" if len(get_keyring()) else " (this server has no keys configured: set CITI_API_KEYS)"
        raise APIError(401, "missing_api_key",
                       "authentication required: send 'Authorization: Bearer <key>'" + hint,
                       headers={"WWW-Authenticate": "Bearer"})
    limit = get_settings().rate_limit_per_minute
    if limit:
        retry = store.hit_rate_limit(tenant, limit)
        if retry is not None:
            raise APIError(429, "rate_limit_exceeded",
                           f"more than {limit} requests in a minute for this key; retry in {retry} s",
                           headers={"Retry-After": str(retry)})
    request.state.tenant = tenant
    return tenant
