"""The Celery application: ``celery -A worker.celery_app worker``.

Redis is the broker and the result backend (and, through :mod:`api.store`, the job store). A worker
runs one job at a time (solo pool, prefetch 1, late acks) on the GPUs it was given
(``CUDA_VISIBLE_DEVICES``); each job runs in a fresh spawned child process (see :mod:`worker.tasks`).
Every worker also runs a reaper thread (see :mod:`worker.lease`) that re-queues jobs whose worker was
lost, and deletes artifacts past their retention.

The module imports neither torch nor the engine's training code, so the API can import it to send tasks.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from api.settings import get_settings

TASK_NAME = "citi.run_job"
log = logging.getLogger("citi.worker")

_settings = get_settings()

celery_app = Celery("citi", broker=_settings.redis_url, backend=_settings.redis_url, include=["worker.tasks"])
celery_app.conf.update(
    task_default_queue=_settings.queue,
    task_routes={TASK_NAME: {"queue": _settings.queue}},
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # One job at a time, run from the worker's main thread: the job's child process dies with it
    # (PR_SET_PDEATHSIG follows the thread that started the child).
    worker_pool="solo",
    worker_concurrency=1,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_expires=24 * 3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Lost workers are found by the job lease (tens of seconds); the broker's own redelivery after the
    # visibility timeout only brings duplicates, which the atomic claim drops.
    broker_transport_options={"visibility_timeout": 3600},
)


def enqueue(job_id: str) -> None:
    """Send the job's task: one message carrying only the job id."""
    celery_app.send_task(TASK_NAME, args=[job_id], queue=_settings.queue)


_reaper = None


@worker_ready.connect
def _start_reaper(sender=None, **_kwargs) -> None:
    global _reaper
    from worker.lease import Reaper

    name = getattr(sender, "hostname", None) or "worker"
    _reaper = Reaper(worker_name=name)
    _reaper.start()
    log.info("reaper started on %s (lease %.0f s, every %.1f s)", name, _settings.lease_seconds,
             _settings.reaper_interval)


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    if _reaper is not None:
        _reaper.stop()
