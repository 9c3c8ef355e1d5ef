"""The queue between the API and the workers: one Celery task, ``citi.run_job``, carrying only a job id.

:data:`celery_app` is configured here, once, for both sides: the API (and a worker's reaper) send
with :func:`enqueue`; ``worker/celery_app.py`` adds the task module and the worker's signals to the
same app and runs it. Redis is the broker and the result backend (and, through
:mod:`citi_service.store`, the job store). Importing this module imports neither torch nor the engine.
"""

from __future__ import annotations

from celery import Celery

from citi_service.settings import get_settings

TASK_NAME = "citi.run_job"

_settings = get_settings()

celery_app = Celery("citi", broker=_settings.redis_url, backend=_settings.redis_url)
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
