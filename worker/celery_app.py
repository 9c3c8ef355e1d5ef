"""The Celery worker application: ``celery -A worker.celery_app worker``.

The app itself (broker, queue, one job at a time: solo pool, prefetch 1, late acks) is
:data:`citi_service.queue.celery_app`, shared with the API that sends the tasks; here it gets its task
module (:mod:`worker.tasks`) and, on every worker, a reaper thread (see :mod:`worker.lease`) that
re-queues jobs whose worker was lost and deletes artifacts past their retention. A worker runs on the
GPUs it was given (``CUDA_VISIBLE_DEVICES``); each job runs in a fresh spawned child process.
"""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutdown

from citi_service.queue import celery_app
from citi_service.settings import get_settings
from worker.lease import Reaper

log = logging.getLogger("citi.worker")

celery_app.conf.include = ["worker.tasks"]

_reaper: Reaper | None = None


@worker_ready.connect
def _start_reaper(sender=None, **_kwargs) -> None:
    global _reaper
    settings = get_settings()
    name = getattr(sender, "hostname", None) or "worker"
    _reaper = Reaper(worker_name=name)
    _reaper.start()
    log.info("reaper started on %s (lease %.0f s, every %.1f s)", name, settings.lease_seconds,
             settings.reaper_interval)


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    if _reaper is not None:
        _reaper.stop()


__all__ = ["celery_app"]
