"""Service settings, read from the environment (and an optional ``.env`` file) by pydantic-settings.

The API process and the workers read the same settings, so one environment configures both.
List-valued settings are comma-separated strings in the environment (``CITI_MODEL_DIRS=/a,/b``);
the ``*_list`` properties split them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class Settings(BaseSettings):
    """Everything the API and the workers can be configured with. Each field names its variable."""

    model_config = SettingsConfigDict(env_prefix="CITI_", env_file=".env", extra="ignore", populate_by_name=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "CITI_REDIS_URL"),
        description="REDIS_URL: Redis is the Celery broker, the result backend and the job store.",
    )
    artifact_dir: str = Field(
        "./artifacts",
        description="CITI_ARTIFACT_DIR: root of local storage (uploaded files, adapters) and of the shared job "
        "working directories (checkpoints) when CITI_STORAGE=local.",
    )
    work_dir: str | None = Field(
        None,
        description="CITI_WORK_DIR: where workers train. Default: <artifact_dir>/work with local storage (shared by "
        "the workers of one host, so a job resumes in place), a temporary directory with S3 storage (checkpoints "
        "are then copied to the bucket and fetched back on resume).",
    )
    api_keys: str = Field(
        "",
        description="CITI_API_KEYS: comma-separated keys, each 'tenant:key' or a bare key (its own tenant).",
    )
    model_dirs: str = Field("", description="CITI_MODEL_DIRS: comma-separated directories local model specs may point into.")
    allowed_models: str = Field(
        "",
        description="CITI_ALLOWED_MODELS: comma-separated model specs a job may name. Unset: the built-in default "
        "plus any model under CITI_MODEL_DIRS.",
    )

    storage: Literal["local", "s3"] = Field("local", description="CITI_STORAGE: 'local' or 's3'.")
    s3_bucket: str = Field("citi-artifacts", description="CITI_S3_BUCKET: the bucket artifacts go to.")
    s3_prefix: str = Field("", description="CITI_S3_PREFIX: key prefix inside the bucket.")
    s3_endpoint_url: str | None = Field(
        None, description="CITI_S3_ENDPOINT_URL: an S3-compatible endpoint (MinIO, moto); unset for AWS."
    )
    s3_region: str = Field("us-east-1", description="CITI_S3_REGION.")
    s3_access_key_id: str | None = Field(
        None, description="CITI_S3_ACCESS_KEY_ID (else boto3's usual credential chain)."
    )
    s3_secret_access_key: str | None = Field(None, description="CITI_S3_SECRET_ACCESS_KEY.")

    max_upload_bytes: int = Field(100 * 1024 * 1024, gt=0, description="CITI_MAX_UPLOAD_BYTES: largest file upload.")
    max_upload_line_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="CITI_MAX_UPLOAD_LINE_BYTES: longest line (one example) of an upload; "
        "a longer one is refused as line_too_long. Uploads are checked a line at a time, so this bounds the "
        "memory one upload takes in the API.")
    max_request_bytes: int = Field(1024 * 1024, gt=0, description="CITI_MAX_REQUEST_BYTES: largest JSON body.")
    max_files_per_tenant: int = Field(1000, gt=0, description="CITI_MAX_FILES_PER_TENANT.")
    max_storage_bytes_per_tenant: int = Field(
        10 * 1024**3, gt=0, description="CITI_MAX_STORAGE_BYTES_PER_TENANT: files plus adapters."
    )
    max_active_jobs_per_tenant: int = Field(
        4, gt=0, description="CITI_MAX_ACTIVE_JOBS_PER_TENANT: jobs not yet finished, per tenant."
    )
    max_job_steps: int | None = Field(None, description="CITI_MAX_JOB_STEPS: refuse budgets above this (unset: no cap).")
    max_job_seconds: float | None = Field(
        None, description="CITI_MAX_JOB_SECONDS: refuse time budgets above this (unset: no cap)."
    )
    job_timeout_seconds: float = Field(
        7 * 24 * 3600, gt=0, description="CITI_JOB_TIMEOUT_SECONDS: a training process running longer is killed."
    )
    job_stall_seconds: float = Field(
        1800.0, gt=0, description="CITI_JOB_STALL_SECONDS: a training process that records no event (progress, "
        "stage, message) for this long has wedged (the engine reports every step) and is killed by its worker; "
        "the job fails with job_stalled. Raise it when a model download or an evaluation runs longer silently.")
    job_overrun_seconds: float = Field(
        1800.0, ge=0, description="CITI_JOB_OVERRUN_SECONDS: a training process still running this long past its "
        "job's own time budget (budget.max_seconds, which the engine plans to end within) is killed by its "
        "worker; the job fails with job_timeout.")
    cancel_grace_seconds: float = Field(
        60.0, gt=0, description="CITI_CANCEL_GRACE_SECONDS: a job's process still running this long after its "
        "cancel (it checks every training step, so it has wedged) is killed by its worker; the job ends cancelled."
    )
    retention_seconds: float = Field(
        30 * 24 * 3600, gt=0, description="CITI_RETENTION_SECONDS: artifacts of finished jobs are deleted after this."
    )
    max_streams_per_process: int = Field(
        256, gt=0, description="CITI_MAX_STREAMS_PER_PROCESS: live event streams (SSE) one API process holds open; "
        "more get 429 before they start. The process's Redis pool is sized from it.")
    max_streams_per_tenant: int = Field(
        32, gt=0, description="CITI_MAX_STREAMS_PER_TENANT: live event streams one tenant holds open in one API "
        "process; more get 429 before they start, so one tenant cannot take every stream.")
    rate_limit_per_minute: int = Field(
        600, ge=0, description="CITI_RATE_LIMIT_PER_MINUTE: requests per key and minute; 0 turns the limit off."
    )
    auth_failures_per_minute: int = Field(
        30, ge=0, description="CITI_AUTH_FAILURES_PER_MINUTE: wrong keys (bearer or dashboard sign-in) one client "
        "address may present in a minute; past it, every key it presents gets 429 until the minute is over (so "
        "guessing stops being useful). 0 turns the throttle off.")

    lease_seconds: float = Field(
        30.0, gt=0, description="CITI_LEASE_SECONDS: a running job's lease; renewed every third of it by heartbeat."
    )
    reaper_interval_seconds: float | None = Field(
        None, description="CITI_REAPER_INTERVAL_SECONDS: how often each worker looks for lapsed leases "
        "(default: a third of the lease)."
    )
    max_attempts: int = Field(
        3, gt=0, description="CITI_MAX_ATTEMPTS: times a job is started before a lost worker fails it."
    )
    queue: str = Field("citi-jobs", description="CITI_QUEUE: the Celery queue jobs go to.")
    device: str | None = Field(None, description="CITI_DEVICE: training device for workers (default: cuda if present).")
    gpu_memory_gb: float = Field(
        80.0, gt=0, description="CITI_GPU_MEMORY_GB: memory of the workers' GPUs, for POST /jobs/estimate."
    )
    gpus_per_job: int | None = Field(
        None, ge=1, description="CITI_GPUS_PER_JOB: GPUs one job trains on, data-parallel (the workers read it "
        "too); POST /jobs/estimate divides the training time by it. Unset: the workers use every GPU they see, "
        "and the estimate assumes one.")
    inference_url: str | None = Field(None, description="CITI_INFERENCE_URL: the inference server.")
    inference_token: SecretStr | None = Field(
        None, description="CITI_INFERENCE_TOKEN: the shared secret the API presents to the inference server. "
        "Required by both: the inference server does not start without it and refuses every request but /healthz "
        "that does not carry it; the API answers chat with 503 until it is set.")

    @field_validator("work_dir", "s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key", "inference_url",
                     "inference_token", "gpus_per_job", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def model_dirs_list(self) -> list[str]:
        """``CITI_MODEL_DIRS`` as absolute paths."""
        return [str(Path(d).expanduser().resolve()) for d in _split(self.model_dirs)]

    @property
    def allowed_models_list(self) -> list[str]:
        """``CITI_ALLOWED_MODELS`` split; empty means the default rule."""
        return _split(self.allowed_models)

    @property
    def api_keys_list(self) -> list[str]:
        """``CITI_API_KEYS`` split (each entry ``tenant:key`` or a bare key)."""
        return _split(self.api_keys)

    @property
    def job_work_root(self) -> Path:
        """Root of the per-job working directories (see ``work_dir``)."""
        if self.work_dir:
            return Path(self.work_dir).expanduser()
        if self.storage == "local":
            return Path(self.artifact_dir).expanduser() / "work"
        import tempfile

        return Path(tempfile.gettempdir()) / f"citi-work-{os.getuid()}"

    @property
    def reaper_interval(self) -> float:
        """Seconds between two reaper passes of one worker."""
        return self.reaper_interval_seconds or max(0.5, self.lease_seconds / 3)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
