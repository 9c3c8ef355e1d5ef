"""Leases: a running job is held by one worker, and a lost worker's job goes back to the queue.

- :class:`Heartbeat` (one per running job, in the worker process) renews the job's lease every third
  of ``CITI_LEASE_SECONDS``. If the lease is lost anyway (the worker stalled and another took over),
  it stops the job's child process at once, so a job never runs twice at the same time.
- :class:`Reaper` (one thread per worker process) records the worker's heartbeat, and puts every job
  whose lease lapsed back in the queue (atomically: however many reapers see it, one re-queues it); the
  next worker resumes it from its last checkpoint. It also deletes artifacts past their retention.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from citi_service.queue import enqueue
from citi_service.settings import Settings, get_settings
from citi_service.storage import Storage, make_storage
from citi_service.store import Store
from worker.artifacts import remove_partial_files, sweep_expired

log = logging.getLogger("citi.worker")

RETENTION_SWEEP_EVERY_S = 60.0


class Heartbeat(threading.Thread):
    """Renew one job's lease until stopped; call ``on_lost`` if it cannot be renewed because another holds it."""

    def __init__(self, store: Store, job_id: str, token: str, lease_s: float, on_lost: Callable[[], None]):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.store, self.job_id, self.token, self.lease_s = store, job_id, token, lease_s
        self.on_lost = on_lost
        self.lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.lease_s / 3):
            try:
                renewed = self.store.renew_lease(self.job_id, self.token, self.lease_s)
            except redis.RedisError:
                log.warning("job %s: Redis did not answer the lease renewal; retrying", self.job_id)
                continue
            if not renewed:
                self.lost = True
                log.error("job %s: lease lost (another worker took the job over); stopping its process", self.job_id)
                self.on_lost()
                return

    def stop(self) -> None:
        """Stop renewing (the lease is released separately)."""
        self._stop_event.set()
        self.join(timeout=5)


class Reaper(threading.Thread):
    """Per-worker background thread: heartbeat, re-queue lapsed jobs, retention."""

    def __init__(
        self,
        *,
        worker_name: str,
        settings: Settings | None = None,
        store: Store | None = None,
        storage: Storage | None = None,
        enqueue: Callable[[str], None] = enqueue,
    ):
        super().__init__(name="citi-reaper", daemon=True)
        self.settings = settings or get_settings()
        self.store = store or Store(self.settings.redis_url)
        self._storage = storage
        self.worker_name = worker_name
        self._enqueue = enqueue
        self.current_job: str | None = None
        self._stop_event = threading.Event()
        self._last_sweep = 0.0

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = make_storage(self.settings)
        return self._storage

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.tick()
            except Exception:  # keep reaping whatever one pass ran into (e.g. Redis restarting)
                log.exception("reaper pass failed")
            self._stop_event.wait(self.settings.reaper_interval)

    def tick(self) -> list[tuple[str, str]]:
        """One pass; returns ``(job id, outcome)`` for each lapsed job handled."""
        self.store.worker_heartbeat(self.worker_name, current_job())
        handled = []
        for job_id in self.store.lapsed_jobs():
            outcome = self.store.requeue(job_id, self.settings.max_attempts)
            if outcome == "requeued":
                log.warning("job %s: its worker was lost; queued again to resume from its last checkpoint", job_id)
                self._enqueue(job_id)
            elif outcome in ("failed", "cancelled"):
                log.warning("job %s: its worker was lost; job %s", job_id, outcome)
                remove_partial_files(self.settings, self.storage, job_id)
            handled.append((job_id, outcome))
        now = time.time()
        if now - self._last_sweep >= RETENTION_SWEEP_EVERY_S:
            self._last_sweep = now
            # One worker sweeps at a time.
            if self.store.r.set(self.store.k("retention-lock"), self.worker_name, nx=True, px=30_000):
                sweep_expired(self.store, self.storage, self.settings, now=now)
        return handled

    def stop(self) -> None:
        """Stop the thread and forget this worker's heartbeat."""
        self._stop_event.set()
        self.join(timeout=5)
        try:
            self.store.worker_gone(self.worker_name)
        except redis.RedisError:
            pass


_current_job: dict[str, object] = {"job": None, "pid": None}


def set_current_job(job_id: str | None, pid: int | None = None) -> None:
    """Tell the heartbeat which job this worker runs, and its process (shown in the store and /metrics)."""
    _current_job.update(job=job_id, pid=pid)


def current_job() -> dict[str, object]:
    """The job this worker process runs now (``job`` and its process ``pid``, or None)."""
    return dict(_current_job)
