"""How a job's files are removed on the worker side: after a failure, after success, after retention.

Where they live (the working directory, the adapter and checkpoint keys) is :mod:`citi_service.keys`.
"""

from __future__ import annotations

import logging
import shutil
import time

from citi_service.keys import checkpoints_prefix, job_prefix, work_dir
from citi_service.settings import Settings
from citi_service.storage import Storage
from citi_service.store import Store

log = logging.getLogger("citi.worker")


def remove_partial_files(settings: Settings, storage: Storage, job_id: str) -> None:
    """Delete everything a job that did not succeed left behind: working directory and stored artifacts."""
    shutil.rmtree(work_dir(settings, job_id), ignore_errors=True)
    try:
        storage.delete_prefix(job_prefix(job_id))
    except Exception:  # storage down: the retention sweep finds nothing to keep anyway
        log.exception("job %s: could not remove its stored files", job_id)


def remove_training_state(settings: Settings, storage: Storage, job_id: str) -> None:
    """After success: drop the working directory and stored checkpoints, keep the adapter."""
    shutil.rmtree(work_dir(settings, job_id), ignore_errors=True)
    if settings.storage != "local":
        storage.delete_prefix(checkpoints_prefix(job_id))


def sweep_expired(store: Store, storage: Storage, settings: Settings, *, now: float | None = None) -> list[str]:
    """Delete the artifacts of jobs finished more than ``CITI_RETENTION_SECONDS`` ago; returns their ids.

    The job records stay (with ``artifacts_deleted: true``) so their history remains visible.
    """
    now = time.time() if now is None else now
    swept = []
    for job_id in store.finished_before(now - settings.retention_seconds):
        job = store.get_job(job_id)
        if job is not None:
            remove_partial_files(settings, storage, job_id)
            if job.get("adapter_bytes") and not job.get("artifacts_deleted"):
                store.add_usage(job["tenant"], -int(job["adapter_bytes"]))
            store.update_job(job_id, artifacts_deleted=True)
            if job.get("fine_tuned_model"):
                store.r.hdel(store.k("models", job["tenant"]), job["fine_tuned_model"])
        store.forget_finished(job_id)
        swept.append(job_id)
    if swept:
        log.info("retention: deleted the artifacts of %d finished job(s)", len(swept))
    return swept
