"""Leases: a running job is held by one worker, and a lost worker's job goes back to the queue.

- :class:`Heartbeat` (one per running job, in the worker process) renews the job's lease every third
  of ``CITI_LEASE_SECONDS``. If the lease is lost anyway (the worker stalled and another took over),
  it stops the job's child process at once, so a job never runs twice at the same time.
- :class:`Reaper` (one thread per worker process) records the worker's heartbeat, and puts every job
  whose lease lapsed back in the queue (atomically: however many reapers see it, one re-queues it); the
  next worker resumes it from its last checkpoint. It also deletes artifacts past their retention.
- :class:`Watchdog` (asked by the worker while it waits for a job's process) says when the process must be
  killed although nobody cancelled it: it has recorded no event for ``CITI_JOB_STALL_SECONDS`` (it has
  wedged: the engine reports every training step), or it runs past its job's time limit (its own
  ``budget.max_seconds`` plus ``CITI_JOB_OVERRUN_SECONDS``, and at most ``CITI_JOB_TIMEOUT_SECONDS``). A
  wedged process keeps its lease alive (the worker's heartbeat renews it), so only this frees the worker.
"""

from __future__ import annotations

import logging
import math
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


class Watchdog:
    """Decides when a running job's process must be killed by its worker: stalled or past its time limit.

    :meth:`check` returns the job's error (``job_stalled`` or ``job_timeout``, with a message saying what to
    do) once one of the limits is crossed, else None. Progress is a new event in the job's stream; while
    Redis does not answer no stall is counted (the process cannot record events then either).
    """

    def __init__(self, store: Store, job_id: str, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.store, self.job_id, self.clock = store, job_id, clock
        self.stall_s = settings.job_stall_seconds
        self.started = self.progress_at = clock()
        try:
            self.last_event = self._last_event()
        except redis.RedisError:
            self.last_event = None  # the first look that reaches Redis counts as progress
        self.limit_s, self.limit_why = settings.job_timeout_seconds, (
            f"ran longer than CITI_JOB_TIMEOUT_SECONDS={settings.job_timeout_seconds:g} s")
        budget_s = self._budget_seconds()
        if budget_s is not None and budget_s + settings.job_overrun_seconds < self.limit_s:
            self.limit_s = budget_s + settings.job_overrun_seconds
            self.limit_why = (f"ran {settings.job_overrun_seconds:g} s (CITI_JOB_OVERRUN_SECONDS) past its time "
                              f"budget, budget.max_seconds={budget_s:g}")

    def _budget_seconds(self) -> float | None:
        try:
            job = self.store.get_job(self.job_id) or {}
        except redis.RedisError:
            return None
        seconds = ((job.get("engine") or {}).get("budget") or {}).get("max_seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds):
            return float(seconds)
        return None

    def _last_event(self) -> str | None:
        entries = self.store.r.xrevrange(self.store.k("job", self.job_id, "events"), count=1)
        return entries[0][0] if entries else None

    def check(self) -> dict | None:
        """The error to fail the job with when its process must be killed now, else None."""
        now = self.clock()
        if now - self.started >= self.limit_s:
            return {"code": "job_timeout", "param": None,
                    "message": f"the training process {self.limit_why}, and was killed; give the job a smaller "
                               "budget (or fewer examples) and submit it again"}
        try:
            last = self._last_event()
        except redis.RedisError:
            self.progress_at = now
            return None
        if last != self.last_event:
            self.last_event, self.progress_at = last, now
            return None
        if now - self.progress_at >= self.stall_s:
            phase = None
            try:
                phase = (self.store.get_job(self.job_id) or {}).get("stage")
            except redis.RedisError:
                pass
            where = f" in its {phase!r} phase" if phase else ""
            return {"code": "job_stalled", "param": None,
                    "message": f"the training process recorded no progress for {now - self.progress_at:.0f} s"
                               f"{where} (CITI_JOB_STALL_SECONDS={self.stall_s:g}): it had wedged and was killed, "
                               "and the worker went on to its next job; submit the job again (it starts over)"}
        return None
