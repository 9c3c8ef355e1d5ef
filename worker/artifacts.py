"""Where a job's files live on the worker side, and how they are removed.

- ``<work root>/<job id>/``: the job's working directory (the child process runs in it):
  ``inputs/`` (its files, fetched from storage) and ``<job id>/`` (the engine's ``out_dir``, with
  ``checkpoints/``). With local storage the work root is under the artifact directory, shared by
  the workers of one host, so a job resumes in place; with S3 it is local scratch and checkpoints
  are copied to ``jobs/<job id>/checkpoints/`` in the bucket.
- ``jobs/<job id>/adapter/`` in storage: the finished adapter.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from api.settings import Settings
from api.storage import Storage
from api.store import Store

log = logging.getLogger("citi.worker")


def work_dir(settings: Settings, job_id: str) -> Path:
    """The job's working directory."""
    return settings.job_work_root / job_id


def checkpoints_prefix(job_id: str) -> str:
    """Storage prefix of a job's checkpoints (S3 workers only)."""
    return f"jobs/{job_id}/checkpoints/"


def adapter_prefix(job_id: str) -> str:
    """Storage prefix of a job's adapter directory."""
    return f"jobs/{job_id}/adapter/"


def remove_partial_files(settings: Settings, storage: Storage, job_id: str) -> None:
    """Delete everything a job that did not succeed left behind: working directory and stored artifacts."""
    shutil.rmtree(work_dir(settings, job_id), ignore_errors=True)
    try:
        storage.delete_prefix(f"jobs/{job_id}/")
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
