"""Where things live: storage keys of files and job artifacts, and a job's working directory on a worker.

The one place these paths are spelled. In storage (see :mod:`citi_service.storage`):

- ``files/<file id>.jsonl``: an uploaded training or test file;
- ``jobs/<job id>/adapter/...``: a finished job's adapter directory (no checkpoints);
- ``jobs/<job id>/checkpoints/...``: training checkpoints, copied here by S3 workers only.

On a worker (``CITI_WORK_DIR``, see :attr:`citi_service.settings.Settings.job_work_root`):
``<work root>/<job id>/`` is the job's working directory, with ``inputs/`` (its files) and
``<job id>/`` (the engine's ``out_dir``, with ``checkpoints/``). With local storage the work root is
under the artifact directory, shared by the workers of one host (and read by the API's dashboard).
"""

from __future__ import annotations

from pathlib import Path

from citi_service.settings import Settings


def file_key(file_id: str) -> str:
    """Where an uploaded file's bytes are stored."""
    return f"files/{file_id}.jsonl"


def job_prefix(job_id: str) -> str:
    """Storage prefix of everything a job stored."""
    return f"jobs/{job_id}/"


def adapter_prefix(job_id: str) -> str:
    """Storage prefix of a job's adapter directory."""
    return f"{job_prefix(job_id)}adapter/"


def checkpoints_prefix(job_id: str) -> str:
    """Storage prefix of a job's checkpoints (S3 workers only)."""
    return f"{job_prefix(job_id)}checkpoints/"


def work_dir(settings: Settings, job_id: str) -> Path:
    """The job's working directory on a worker."""
    return settings.job_work_root / job_id


def out_dir(job_id: str) -> Path:
    """The engine's ``out_dir``, relative to the job's working directory (the same on every worker)."""
    return Path(job_id)


def work_checkpoints_dir(settings: Settings, job_id: str) -> Path:
    """The checkpoints the engine writes in the job's working directory."""
    return work_dir(settings, job_id) / out_dir(job_id) / "checkpoints"
