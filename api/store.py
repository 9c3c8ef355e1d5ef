"""Moved to :mod:`citi_service.store`. Kept only for ``docker/worker-healthcheck.py``, which imports it
by this name; delete this file once that script imports ``citi_service.store``."""

from citi_service.store import Store

__all__ = ["Store"]
