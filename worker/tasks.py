"""The one task: run a job. Thin by design: claim the job, hold its lease, run it in a child process,
record how that process ended.

The training itself runs in :func:`worker.runner.run_job`, in a fresh process started with the
``spawn`` method: nothing of a previous job (memory, GPU context, threads) survives into the next, a
crash of the child cannot take the worker down, and the worker process never imports torch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import time
from functools import lru_cache

from redis.exceptions import RedisError

from citi_service.queue import TASK_NAME, celery_app, enqueue
from citi_service.records import TERMINAL, status_event
from citi_service.settings import get_settings
from citi_service.storage import Storage, make_storage
from citi_service.store import Store
from worker.artifacts import remove_partial_files
from worker.lease import Heartbeat, Watchdog, set_current_job
from worker.runner import EXIT_LEASE_LOST, EXIT_PROCESS_LOST, REDIS_OUTAGE_S, run_job_process

log = logging.getLogger("citi.worker")

_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CANCEL_POLL_S = 1.0  # how often the worker looks at the cancel flag of the job it runs


@lru_cache(maxsize=1)
def _store() -> Store:
    return Store(get_settings().redis_url, outage_s=REDIS_OUTAGE_S)


@lru_cache(maxsize=1)
def _storage() -> Storage:
    return make_storage(get_settings())


@celery_app.task(name=TASK_NAME, bind=True, acks_late=True)
def run_job(self, job_id: str) -> dict:
    """Run job ``job_id`` to its end (or drop the delivery when another worker has it or it has ended)."""
    return execute(job_id, worker=self.request.hostname or f"pid-{os.getpid()}")


def execute(job_id: str, *, worker: str) -> dict:
    """Claim, run in a child process, record the outcome. Returns a small summary (the Celery result)."""
    settings, store = get_settings(), _store()
    token = secrets.token_hex(16)
    outcome, detail = store.claim(job_id, token, worker, settings.lease_seconds)
    if outcome == "cancelling":
        # Cancelled while its last worker was lost: nothing left to stop.
        store.transition(job_id, "cancelled", from_=["cancelling"],
                         event=status_event("cancelled", "cancelled"))
        remove_partial_files(settings, _storage(), job_id)
        return {"job_id": job_id, "outcome": "cancelled"}
    if outcome != "claimed":
        # Duplicate or stale delivery: the job runs elsewhere, has ended, or was deleted.
        log.info("job %s: delivery dropped (%s)", job_id, outcome)
        if outcome == "leased":
            store.add_event(job_id, "message", "a duplicate delivery of this job was ignored: another worker runs it",
                            {"worker": worker})
        return {"job_id": job_id, "outcome": outcome}

    log.info("job %s: claimed by %s (attempt %s)", job_id, worker, detail)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=run_job_process, args=(job_id, token, os.getpid()), name=f"citi-{job_id}",
                       daemon=False)
    heartbeat = Heartbeat(store, job_id, token, settings.lease_seconds, on_lost=lambda: _kill(proc))
    try:
        proc.start()
        set_current_job(job_id, proc.pid)
        store.worker_heartbeat(worker, {"job": job_id, "pid": proc.pid})
        heartbeat.start()
        why, kill_error = _wait(proc, store, job_id, token, settings)
        timed_out = why == "timeout"
    finally:
        heartbeat.stop()
        set_current_job(None)
        store.worker_heartbeat(worker, {"job": None, "pid": None})

    code = proc.exitcode
    if heartbeat.lost or code == EXIT_LEASE_LOST:
        return {"job_id": job_id, "outcome": "lease_lost"}
    job = store.get_job(job_id) or {}
    if job.get("status") == "paused":
        # Parked at a checkpoint by its process (which gave the lease up): it waits, files kept, for a resume.
        return {"job_id": job_id, "outcome": "paused"}
    if job.get("status") == "cancelling":
        # The caller asked it to stop and its process has ended without recording that (it crashed, was
        # killed or timed out while stopping): the cancel is what happened, whatever the exit code says.
        if code != 0 or timed_out:
            log.warning("job %s: its process ended (exit code %s) while cancelling; it is cancelled", job_id, code)
        result, _ = store.transition(job_id, "cancelled", from_=["cancelling"], token=token,
                                     event=status_event("cancelled", "cancelled"))
        if result == "ok":
            remove_partial_files(settings, _storage(), job_id)
        store.release_lease(job_id, token)
        return {"job_id": job_id, "outcome": "cancelled"}
    if code == EXIT_PROCESS_LOST and not timed_out:
        # One of its data-parallel training processes was killed (its launcher says so): the job goes back to
        # the queue and resumes from its last checkpoint, as when a worker is lost (at most CITI_MAX_ATTEMPTS).
        log.warning("job %s: a training process was killed; queueing it again", job_id)
        store.release_lease(job_id, token)
        outcome = store.requeue(job_id, settings.max_attempts, reason="training_process_lost")
        if outcome == "requeued":
            enqueue(job_id)
        return {"job_id": job_id, "outcome": outcome}
    if code is not None and -code in _SHUTDOWN_SIGNALS and not timed_out:
        # Stopped from outside (the worker is shutting down): not the job's fault. It goes back to the
        # queue and resumes from its last checkpoint on the next worker.
        log.warning("job %s: its process was stopped by %s; queueing it again", job_id, signal.Signals(-code).name)
        store.release_lease(job_id, token)
        if store.requeue(job_id, settings.max_attempts, reason="worker_shutdown") == "requeued":
            enqueue(job_id)
        return {"job_id": job_id, "outcome": "requeued"}
    job = store.get_job(job_id) or {}
    if code != 0 or timed_out or job.get("status") not in TERMINAL:
        error = kill_error or _crash_error(code, timed_out, settings.job_timeout_seconds)
        log.error("job %s: %s", job_id, error["message"])
        result, _ = store.transition(
            job_id, "failed", token=token, error=error,
            event=status_event("failed", error["message"], error=error, level="error"))
        if result == "ok":
            remove_partial_files(settings, _storage(), job_id)
    store.release_lease(job_id, token)
    final = store.get_job(job_id) or {}
    return {"job_id": job_id, "outcome": final.get("status", "deleted")}


def _wait(proc, store: Store, job_id: str, token: str, settings) -> tuple[str | None, dict | None]:
    """Wait for the job's process to end. Kill it when its :class:`~worker.lease.Watchdog` says so (no event
    for ``CITI_JOB_STALL_SECONDS``, or past its time limit: its budget plus ``CITI_JOB_OVERRUN_SECONDS``, at
    most ``CITI_JOB_TIMEOUT_SECONDS``), or ``CITI_CANCEL_GRACE_SECONDS`` after its cancel was asked (a process
    wedged in a kernel, a C call or a stopped state never sees the flag; the cancel must still happen).
    Returns ``(why, error)``: ``why`` None when it ended by itself, else why it was killed, ``"timeout"`` or
    ``"cancel"``; ``error`` the watchdog's error (the job fails with it) when the watchdog had it killed."""
    watchdog = Watchdog(store, job_id, settings)
    cancel_seen: float | None = None
    while True:
        proc.join(timeout=min(CANCEL_POLL_S, settings.cancel_grace_seconds))
        if not proc.is_alive():
            return None, None
        now = time.monotonic()
        why, error = None, None
        if cancel_seen is None:
            try:
                cancel, _ = store.runner_check(job_id, token)
            except RedisError:
                cancel = False  # the store is away: the lease machinery deals with that
            if cancel:
                cancel_seen = now
            elif (error := watchdog.check()) is not None:
                why = "timeout"
                log.warning("job %s: %s; killing its process", job_id, error["code"])
        elif now - cancel_seen >= settings.cancel_grace_seconds:
            why = "cancel"
            log.warning("job %s: still running %.0f s after its cancel; killing its process", job_id,
                        settings.cancel_grace_seconds)
        if why is not None:
            _kill(proc)
            proc.join()
            return why, error


def _kill(proc) -> None:
    """SIGKILL the job's process (a stopped one too); its training processes, if any, die with it
    (PR_SET_PDEATHSIG, see worker.runner)."""
    if proc.pid is not None and proc.is_alive():
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended in between


def _crash_error(code: int | None, timed_out: bool, timeout_s: float) -> dict:
    """The error of a job whose process ended without recording an outcome (or was killed by :func:`_wait`)."""
    if timed_out:
        message = f"the training process ran longer than CITI_JOB_TIMEOUT_SECONDS={timeout_s:g} s and was stopped"
        return {"code": "job_timeout", "param": None, "message": message}
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (most often the host ran out of memory: try a smaller batch_size or max_length)" \
            if -code == signal.SIGKILL else ""
        message = f"the training process was killed by signal {name}{hint}"
    else:
        message = f"the training process exited with code {code} without recording an outcome"
    return {"code": "training_process_crashed", "param": None, "message": message}

