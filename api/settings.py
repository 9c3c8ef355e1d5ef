"""Moved to :mod:`citi_service.settings`. Kept only for ``docker/worker-healthcheck.py``, which imports it
by this name; delete this file once that script imports ``citi_service.settings``."""

from citi_service.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
