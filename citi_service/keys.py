"""Where things live: storage keys of files and job artifacts, and a job's working directory on a worker.

The one place these paths are spelled. In storage (see :mod:`citi_service.storage`):

- ``files/<file id>.jsonl``: an uploaded training or test file;
- ``jobs/<job id>/adapter/...``: a finished job's adapter directory (no checkpoints);
- ``jobs/<job id>/results/<job id>.tar.gz``: the adapter directory as one archive, a result file;
- ``jobs/<job id>/checkpoints/...``: training checkpoints, copied here by S3 workers only.

A succeeded job's result files (purpose ``fine-tune-results``) have ids that name their job
(``file-ftres-<24 hex of the job>-adapter`` and ``-report``), so :func:`file_key` finds their bytes among
the job's artifacts: the archive above, and the adapter's own ``report.json`` (a reference, not a copy).
They go when the job's artifacts go.

On a worker (``CITI_WORK_DIR``, see :attr:`citi_service.settings.Settings.job_work_root`):
``<work root>/<job id>/`` is the job's working directory, with ``inputs/`` (its files) and
``<job id>/`` (the engine's ``out_dir``, with ``checkpoints/``). With local storage the work root is
under the artifact directory, shared by the workers of one host (and read by the API's dashboard).
"""

from __future__ import annotations

from pathlib import Path

from citi_service.settings import Settings

RESULT_FILE_PREFIX = "file-ftres-"
RESULT_FILES = {"adapter": "the adapter archive", "report": "the evaluation report"}


def result_file_id(job_id: str, name: str) -> str:
    """The id of a job's result file ``name`` (``adapter`` or ``report``)."""
    assert name in RESULT_FILES
    return f"{RESULT_FILE_PREFIX}{job_id.removeprefix('ftjob-')}-{name}"


def result_file_job(file_id: str) -> tuple[str, str] | None:
    """``(job id, name)`` of a result file id, or None for any other id."""
    if not file_id.startswith(RESULT_FILE_PREFIX):
        return None
    job_hex, _, name = file_id[len(RESULT_FILE_PREFIX):].rpartition("-")
    if name not in RESULT_FILES or not job_hex:
        return None
    return f"ftjob-{job_hex}", name


def file_key(file_id: str) -> str:
    """Where a file's bytes are stored: an upload's own object, or for a result file the job's artifact."""
    result = result_file_job(file_id)
    if result is not None:
        job_id, name = result
        return results_archive_key(job_id) if name == "adapter" else adapter_prefix(job_id) + "report.json"
    return f"files/{file_id}.jsonl"


def job_prefix(job_id: str) -> str:
    """Storage prefix of everything a job stored."""
    return f"jobs/{job_id}/"


def adapter_prefix(job_id: str) -> str:
    """Storage prefix of a job's adapter directory."""
    return f"{job_prefix(job_id)}adapter/"


def results_archive_key(job_id: str) -> str:
    """Storage key of a job's adapter archive (its result file ``adapter``)."""
    return f"{job_prefix(job_id)}results/{job_id}.tar.gz"


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
