"""What the API and the workers write to each other through the store: job statuses, events, model ids.

A job record is a :class:`JobRecord` (a typed dict: the hash ``job:<id>`` in Redis, one JSON value per field);
the API builds it in ``api/routers/jobs.py`` and serves it almost as stored. Its ``stage`` field holds the job's
*phase* (the engine's ``validating``, ``loading``, ``importance``, ..., a training stage, then ``done``):
the JSON keeps the name ``stage``, the service code says phase.
"""

from __future__ import annotations

import re
import time
from pathlib import PurePath
from typing import Any, Literal, TypedDict

STATUSES = ("validating_files", "queued", "running", "cancelling", "paused", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
# Unfinished jobs a worker may hold (or will): ``paused`` is unfinished too, but no worker holds it.
ACTIVE = ("validating_files", "queued", "running", "cancelling")
RESULT_FILE_PURPOSE = "fine-tune-results"

EventLevel = Literal["info", "warning", "error"]


class Event(TypedDict):
    """One job event as written to the store (the store adds ``object``, ``id`` and ``seq`` when read).

    ``type`` is the engine's (``stage``, ``progress``, ``message``, ``importance``, ``eval``, ``done``)
    or the service's (``status``, ``checkpoint``); ``data`` carries the details (for ``status`` events
    the new ``status`` and, when failed, the ``error``).
    """

    created_at: int
    type: str
    level: EventLevel
    message: str
    data: dict[str, Any]


class JobRecord(TypedDict, total=False):
    """A job as stored (the hash ``job:<id>``): what the API writes when it creates the job, and what the
    store's transitions and the worker add while it runs. ``api.routers.jobs.public_job`` turns it into the
    API's job object; ``tests/service/test_e2e.py`` checks that a finished job holds no field but these."""

    # written once, by the API (api/routers/jobs.py)
    id: str
    tenant: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None
    general_file: str | None
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    integrations: list[dict[str, Any]]
    budget: dict[str, Any]
    components: dict[str, Any]
    engine: dict[str, Any]  # the engine's config, what the worker builds FinetuneConfig from
    parent_model: str  # a continuation: the ft: model it continues, and that model's job
    parent_job: str
    # the store's state machine (citi_service/store.py)
    seq: int
    status: str  # one of STATUSES
    attempts: int
    resumes: int
    worker: str
    started_at: int | None
    finished_at: int | None
    error: dict[str, Any] | None
    pause_requested: bool
    artifacts_deleted: bool
    # the worker, while it runs and when it ends (worker/runner.py)
    stage: str | None  # the job's phase (see the module docstring)
    progress: dict[str, Any] | None
    estimated_finish: int | None
    selected_components: dict[str, list[str]] | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    result_files: list[str]
    adapter_files: list[str]
    adapter_bytes: int
    has_report: bool
    report: dict[str, Any] | None


def new_event(type_: str, message: str, data: dict | None = None, level: EventLevel = "info") -> Event:
    """An event (its ``seq`` is assigned when it is stored). Every event the service writes is built here."""
    return {"created_at": int(time.time()), "type": type_, "level": level, "message": message, "data": data or {}}


def status_event(status: str, message: str, *, error: dict | None = None, level: EventLevel = "info",
                 **data: Any) -> Event:
    """The event that reports a change of the job's ``status`` (with its ``error`` when it failed)."""
    assert status in STATUSES
    return new_event("status", message, {"status": status, **({"error": error} if error else {}), **data},
                     level=level)


def short_job_id(job_id: str) -> str:
    """The first 12 hex digits of a job id: the job's part of model, checkpoint and event ids."""
    return job_id.removeprefix("ftjob-")[:12]


def fine_tuned_model_id(model: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base model name>:<suffix or citi>:<short job id>``, unique per job."""
    base = re.sub(r"[^A-Za-z0-9_.\-]", "-", PurePath(model.rstrip("/")).name or model)[:64]
    return f"ft:{base}:{suffix or 'citi'}:{short_job_id(job_id)}"


def checkpoint_model_id(fine_tuned_model: str, step: int) -> str:
    """OpenAI's ``fine_tuned_model_checkpoint`` name of the checkpoint at ``step`` of a job."""
    return f"{fine_tuned_model}:ckpt-step-{step}"


def event_id(job_id: str, seq: int) -> str:
    """OpenAI's id of the job's event ``seq``: ``ftevent-<12 hex>-<seq>``."""
    return f"ftevent-{short_job_id(job_id)}-{seq}"


def event_seq(event_id_or_seq: str) -> int | None:
    """The ``seq`` in an event id (``ftevent-...-<seq>``, or the seq itself), or None when it holds none."""
    tail = event_id_or_seq.strip().rsplit("-", 1)[-1]
    return int(tail) if tail.isascii() and tail.isdigit() and len(tail) <= 19 else None
