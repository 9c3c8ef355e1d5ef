"""Fine-tuning jobs: one router, which ``api/main.py`` mounts at ``/jobs`` and at OpenAI's ``/v1/fine_tuning/jobs``.

A job is checked completely at submit time with the engine's own torch-free rules (model spec, files,
budget, components, hyperparameters), stored as ``queued`` and sent to the workers as one task carrying
only its id (:func:`citi_service.queue.enqueue`). Everything after that (status, phase, progress,
events, the adapter) comes from the store and the artifact storage, written by the worker.

Two routes answer in OpenAI's shape under ``/v1/fine_tuning/jobs`` and keep ours under ``/jobs`` (our
clients' contract): the events page (newest first, ``ftevent-`` ids, ``message``/``metrics`` types,
``after`` an event id) and the checkpoints page (only checkpoints whose files are still there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from redis.exceptions import RedisError
from starlette.background import BackgroundTask

from api.archive import stream_tar_gz
from api.deps import get_storage, get_store, get_tenant, settings_dep
from api.openai_compat import openai_hyperparameters, openai_view, translate_hyperparameters
from api.schemas import (
    CheckpointList,
    Deleted,
    ErrorResponse,
    Estimate,
    EventList,
    Job,
    JobCreate,
    JobList,
    JobStatus,
)
from citi_service.errors import APIError, error_body, not_found
from citi_service.keys import (
    adapter_prefix,
    checkpoints_prefix,
    file_key,
    job_prefix,
    work_checkpoints_dir,
    work_dir,
)
from citi_service.model_access import check_model
from citi_service.queue import enqueue
from citi_service.records import (
    TERMINAL,
    JobRecord,
    checkpoint_model_id,
    event_id,
    event_seq,
    fine_tuned_model_id,
    status_event,
)
from citi_service.settings import Settings
from citi_service.storage import Storage
from citi_service.store import IdempotencyConflict, LimitExceeded, Store

log = logging.getLogger("citi.api")

_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
_SSE_BLOCK_MS = 5000
MAX_EVENT_SEQ = 2**63 - 1  # event seqs are Redis stream ids' first part; larger values are no event's
_METADATA_MAX = (16, 64, 512)
OPENAI_PREFIX = "/v1/fine_tuning/"
TRAINING_STAGES = ("router_pretraining", "molora", "uco", "train")
# Methods whose adapter merges exactly into its base, so a later job can train on the merged model.
MERGEABLE_METHODS = ("lora", "full")


# -- checking a request ----------------------------------------------------------------------------


def _param_of(message: str) -> str | None:
    for name in ("budget", "components", "hyperparameters", "test_fraction", "checkpoint_every", "method", "seed"):
        if name in message:
            return "method.hyperparameters" if name == "hyperparameters" else name
    return None


def engine_config(body: JobCreate, settings: Settings, *, seed: int):
    """The engine's ``FinetuneConfig`` for a request (placeholder paths), or a 400 saying what is wrong."""
    from citi_engine.errors import BudgetError
    from citi_engine.ranges import SettingError
    from citi_engine.training.config import FinetuneConfig

    method = body.method.type if body.method else "citi"
    if method == "supervised":
        method = "citi"  # OpenAI's supervised fine-tuning is our default method
    elif body.method and body.method.supervised is not None:
        raise APIError(400, "invalid_parameters", f"method.supervised goes with method.type 'supervised', not "
                       f"'{body.method.type}'; put the hyperparameters in method.hyperparameters",
                       param="method.supervised")
    hyper, where = {}, {}
    sources = [("hyperparameters", body.hyperparameters or {})]
    if body.method:
        sources.append(("method.hyperparameters", body.method.hyperparameters))
        if body.method.supervised is not None:
            sources.append(("method.supervised.hyperparameters", body.method.supervised.hyperparameters))
    for place, values in sources:  # later places win: method's over the top-level ones
        hyper.update(values)
        where.update(dict.fromkeys(values, place))
    hyper = translate_hyperparameters(method, hyper, where)
    budget = body.budget.model_dump(exclude_none=True) if body.budget else {}
    if settings.max_job_steps is not None:
        if budget.get("max_steps", 0) > settings.max_job_steps:
            raise APIError(400, "budget_too_large", f"budget.max_steps may be at most {settings.max_job_steps} "
                           "on this server", param="budget.max_steps")
        budget.setdefault("max_steps", settings.max_job_steps)
    if settings.max_job_seconds is not None:
        if budget.get("max_seconds", 0) > settings.max_job_seconds:
            raise APIError(400, "budget_too_large", f"budget.max_seconds may be at most {settings.max_job_seconds:g}"
                           " on this server", param="budget.max_seconds")
        budget.setdefault("max_seconds", settings.max_job_seconds)
    kwargs: dict[str, Any] = {
        "model": body.model,
        "training_file": "training_file.jsonl",
        "out_dir": "out",
        "method": method,
        "seed": seed,
        "budget": budget,
        "components": body.components.model_dump(exclude_none=True) if body.components else {},
        "hyperparameters": hyper,
    }
    if body.test_fraction is not None:
        kwargs["test_fraction"] = body.test_fraction
    if body.checkpoint_every is not None:
        kwargs["checkpoint_every"] = body.checkpoint_every
    try:
        cfg = FinetuneConfig(**kwargs)
    except SettingError as exc:  # one setting out of its range, named as the request spells it
        param = exc.param or _param_of(str(exc))
        if param and param.startswith("hyperparameters."):
            param = "method." + param
        raise APIError(400, "invalid_parameters", str(exc), param=param) from exc
    except ValueError as exc:
        raise APIError(400, "invalid_parameters", str(exc), param=_param_of(str(exc))) from exc
    except BudgetError as exc:
        raise APIError(400, exc.code, exc.message, param=f"budget.{exc.param}" if exc.param else "budget") from exc
    from citi_engine.budget import check_budget

    try:
        # Token budgets are checked by the worker, which counts tokens exactly.
        check_budget(cfg.budget, n_stages=len(cfg.stages), tokens_per_step=0.0, stage_names=list(cfg.stages))
    except BudgetError as exc:
        raise APIError(400, exc.code, exc.message, param=f"budget.{exc.param}" if exc.param else "budget") from exc
    return cfg


def _check_file(store: Store, tenant: str, file_id: str | None, param: str, *, training: bool) -> dict | None:
    if file_id is None:
        return None
    record = store.get_file(tenant, file_id)
    if record is None:
        raise APIError(404, "file_not_found", f"{param} '{file_id}' does not exist (or belongs to another key); "
                       "upload it with POST /v1/files", param=param)
    if record.get("purpose") != "fine-tune":
        raise APIError(400, "invalid_file_purpose", f"{param} '{file_id}' is a file of purpose "
                       f"'{record.get('purpose')}' (a job's result); pass a file uploaded with purpose 'fine-tune'",
                       param=param)
    if training and record.get("format") == "test":
        raise APIError(400, "invalid_file_format", f"{param} '{file_id}' is a tool test file (it has ground_truth "
                       "lines); pass it as validation_file and train on a file of chat examples", param=param)
    return record


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    n, key_len, value_len = _METADATA_MAX
    if len(metadata) > n:
        raise APIError(400, "invalid_metadata", f"metadata may hold at most {n} pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > key_len or len(value) > value_len:
            raise APIError(400, "invalid_metadata", f"metadata keys may be {key_len} and values {value_len} "
                           f"characters long at most ('{key[:20]}' is too long)", param="metadata")


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[key]=value`` query parameters (OpenAI's list filter) as a dict, bounded as metadata is."""
    out: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if not name.startswith("metadata"):
            continue
        key = name[len("metadata"):]
        if not (key.startswith("[") and key.endswith("]") and len(key) > 2):
            raise APIError(400, "invalid_metadata", f"metadata filters are spelled metadata[key]=value, got "
                           f"'{name[:80]}'", param="metadata")
        out[key[1:-1]] = value
    _check_metadata(out)
    return out


# -- the job object --------------------------------------------------------------------------------

_INTERNAL = ("tenant", "seq", "worker", "engine", "adapter_bytes", "has_report", "started_at", "resumes",
             "parent_model")


def public_job(job: dict, store: Store) -> Job:
    """The API form of a job record."""
    d = {k: v for k, v in job.items() if k not in _INTERNAL}
    job_id, status = job["id"], job["status"]
    d["organization_id"] = job["tenant"]
    if job.get("parent_model"):  # a continuation: OpenAI's `model` is the fine-tuned model it continues
        d["model"], d["base_model"] = job["parent_model"], job["model"]
    hyper, method = d.get("hyperparameters") or {}, (d.get("method") or {}).get("type")
    if hyper and "n_epochs" not in hyper and method in ("citi", "lora", "full"):  # stored before they were recorded
        d["hyperparameters"] = {**hyper, **openai_view(method, hyper)}
    # The flag outlives a pause that never came (the job ended first): it means something only while unfinished.
    d["pause_requested"] = bool(job.get("pause_requested")) and status not in (*TERMINAL, "paused")
    d["queue_position"] = store.queue_position(job_id) if status == "queued" else None
    d["events_url"] = f"/jobs/{job_id}/events"
    available = status == "succeeded" and not job.get("artifacts_deleted")
    files = d.get("result_files") or []
    if files and not all(f.startswith("file-") for f in files):  # stored before result files were registered
        d.setdefault("adapter_files", files)
        files = []
    d["result_files"] = files if available else []  # their file ids no longer answer once the artifacts are gone
    d["adapter_url"] = f"/jobs/{job_id}/adapter" if available else None
    d["report_url"] = f"/jobs/{job_id}/report" if available and job.get("has_report") else None
    return Job(**d)


def parent_job(store: Store, tenant: str, model: str) -> dict | None:
    """The caller's succeeded job whose fine-tuned ``model`` (``ft:...``) a new job continues, or None for a base
    model; a 400 when the model is unknown or cannot be continued.

    Only a ``lora`` or ``full`` model can: its adapter merges exactly into its base, so the new job trains a plain
    model, as a ``full`` job would. A CITI model cannot: its MOLoRA experts are mixed per token by learned routers,
    which no fixed weight holds, and the engine cannot (yet) go on training a saved CITI adapter.
    """
    if not model.startswith("ft:"):
        return None
    job = store.get_job_by_model(tenant, model)
    if job is None:
        raise APIError(400, "model_not_found", f"no fine-tuned model '{model}' for this key (GET /v1/models lists "
                       "yours)", param="model")
    method = (job.get("method") or {}).get("type")
    if method not in MERGEABLE_METHODS:
        raise APIError(400, "model_not_continuable",
                       f"'{model}' is a {method} model: its MOLoRA experts are mixed per token by learned routers and "
                       "cannot be merged into the base weights to train on, so it cannot be continued. Train a new "
                       f"job on its base '{job['model']}' with the earlier training data added to training_file; "
                       "only lora and full models can be continued (with method 'full')", param="model")
    return job


def _owned_job(store: Store, tenant: str, job_id: str) -> dict:
    job = store.get_job_for(tenant, job_id)
    if job is None:
        raise not_found("job", job_id, "job_id")
    return job


# -- routes ----------------------------------------------------------------------------------------

router = APIRouter()


@router.post("", response_model=Job, responses={**_ERRORS, 409: {"model": ErrorResponse},
                                                429: {"model": ErrorResponse}})
def create_job(
    body: JobCreate,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    settings: Settings = Depends(settings_dep),
) -> Job:
    """Create a fine-tuning job. With an ``Idempotency-Key`` header a retried request returns the same job.

    ``model`` may be one of the caller's fine-tuned ``lora`` or ``full`` models (``ft:...``) with ``method.type``
    ``full``: the job trains every weight of that model merged into its base (see :func:`parent_job`).
    """
    parent = parent_job(store, tenant, body.model)
    if parent is not None:
        body = body.model_copy(update={"model": parent["model"]})
    check_model(body.model, settings)
    _check_file(store, tenant, body.training_file, "training_file", training=True)
    _check_file(store, tenant, body.validation_file, "validation_file", training=False)
    _check_file(store, tenant, body.general_file, "general_file", training=True)
    _check_metadata(body.metadata)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - 1)
    cfg = engine_config(body, settings, seed=seed)  # every setting finite and in range before anything else
    if parent is not None and cfg.method != "full":
        raise APIError(400, "model_not_continuable",
                       f"continuing {parent['fine_tuned_model']} trains every weight of it (its adapter merged into "
                       f"its base), which is method 'full'; pass method {{\"type\": \"full\"}}. A {cfg.method} "
                       "adapter on top of it could not be served: adapters apply to a base model",
                       param="method.type")
    method_record: dict[str, Any] = {"type": cfg.method, "hyperparameters": asdict(cfg.hyperparameters)}
    if body.method and body.method.type == "supervised":  # OpenAI's shape beside ours: the type that ran is citi
        method_record["supervised"] = {"hyperparameters": openai_hyperparameters(cfg)}
    body_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    job_id = "ftjob-" + secrets.token_hex(12)
    record: JobRecord = {
        "id": job_id,
        "tenant": tenant,
        "created_at": int(time.time()),
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "general_file": body.general_file,
        "suffix": body.suffix,
        "seed": seed,
        "metadata": body.metadata,
        "method": method_record,
        "hyperparameters": {**asdict(cfg.hyperparameters), **openai_hyperparameters(cfg)},
        "integrations": [i.model_dump(mode="json") for i in body.integrations or []],
        "budget": asdict(cfg.budget),
        "components": asdict(cfg.components),
        "engine": {"model": cfg.model, "method": cfg.method, "seed": cfg.seed, "budget": asdict(cfg.budget),
                   "components": asdict(cfg.components), "hyperparameters": asdict(cfg.hyperparameters),
                   "test_fraction": cfg.test_fraction, "checkpoint_every": cfg.checkpoint_every},
        "fine_tuned_model": None,
        "error": None,
        "trained_tokens": None,
        "estimated_finish": None,
        "finished_at": None,
        "started_at": None,
        "stage": None,  # the job's phase, written by the worker (citi_service.records)
        "progress": None,
        "selected_components": None,
        "attempts": 0,
        "result_files": [],
        "artifacts_deleted": False,
    }
    if parent is not None:
        record.update(parent_model=parent["fine_tuned_model"], parent_job=parent["id"])
    try:
        job, created = store.create_job(record, max_active=settings.max_active_jobs_per_tenant,
                                        idempotency_key=idempotency_key, body_hash=body_hash)
    except LimitExceeded as exc:
        raise APIError(429, "too_many_active_jobs",
                       f"this key has {exc.active} unfinished jobs, the most it may run at once; wait for one "
                       "to end or cancel one", headers={"Retry-After": "60"}) from exc
    except IdempotencyConflict as exc:
        raise APIError(409, "idempotency_key_reused",
                       f"this Idempotency-Key was used for job {exc.job_id} with a different request; use a new "
                       "key for a new job", param="Idempotency-Key") from exc
    if created:
        try:
            enqueue(job_id)
        except Exception as exc:
            log.exception("job %s: could not send its task", job_id)
            error = {"code": "queue_unavailable", "param": None,
                     "message": "the job could not be queued (the broker did not answer); submit it again"}
            store.transition(job_id, "failed", from_=["queued"], error=error,
                             event=status_event("failed", error["message"], error=error, level="error"))
            raise APIError(503, "queue_unavailable", error["message"]) from exc
        job = store.get_job(job_id) or job
    return public_job(job, store)


@router.post("/estimate", response_model=Estimate, responses=_ERRORS)
def estimate_job(
    body: JobCreate,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
    settings: Settings = Depends(settings_dep),
) -> Estimate:
    """Tokens, steps, time and GPU memory a job would need, and whether that fits its budget."""
    from api.estimate import estimate_job as estimate
    from api.estimate import read_examples

    parent = parent_job(store, tenant, body.model)
    if parent is not None:
        body = body.model_copy(update={"model": parent["model"]})
    resolved = check_model(body.model, settings)
    record = _check_file(store, tenant, body.training_file, "training_file", training=True)
    _check_file(store, tenant, body.validation_file, "validation_file", training=False)
    general = _check_file(store, tenant, body.general_file, "general_file", training=True)
    cfg = engine_config(body, settings, seed=body.seed or 0)
    # The files are read a line at a time and sampled at one rate: a large upload is never held whole.
    n_examples = record["n_examples"] + (general["n_examples"] if general is not None else 0)
    examples = read_examples(storage, file_key(body.training_file), n_examples)
    n_tool, n_general = record["n_tool"], record["n_general"]
    if general is not None:
        examples += read_examples(storage, file_key(body.general_file), n_examples)
        n_general += general["n_examples"]
    device = "cpu" if (settings.device or "").startswith("cpu") else "gpu"
    gpus = settings.gpus_per_job
    if gpus is None and (settings.device or "").startswith("cuda:"):
        gpus = 1  # the workers train on the one GPU CITI_DEVICE names
    result = estimate(cfg, resolved=resolved, examples=examples, n_tool=n_tool, n_general=n_general,
                      has_validation_file=body.validation_file is not None, device=device,
                      gpu_memory_gb=settings.gpu_memory_gb, gpus=gpus, n_examples=n_examples)
    return Estimate(**result)


@router.get("", response_model=JobList, responses=_ERRORS)
def list_jobs(
    request: Request,
    after: str | None = Query(None, description="A job id: list the jobs after it."),
    limit: int = Query(20, ge=1, le=100),
    status: JobStatus | None = Query(None, description="Only jobs in this status."),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
) -> JobList:
    """The caller's jobs, newest first. OpenAI's ``metadata[key]=value`` query parameters keep only the jobs whose
    metadata holds every such pair."""
    metadata = _metadata_filter(request)
    jobs, has_more = store.list_jobs(tenant, after=after, limit=limit, status=status, metadata=metadata)
    return JobList(data=[public_job(j, store) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=Job, responses=_ERRORS)
def get_job(job_id: str, tenant: str = Depends(get_tenant), store: Store = Depends(get_store)) -> Job:
    """One job, with its place in the queue while it waits."""
    return public_job(_owned_job(store, tenant, job_id), store)


@router.post("/{job_id}/cancel", response_model=Job, responses={**_ERRORS, 409: {"model": ErrorResponse}})
def cancel_job(
    job_id: str,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
    settings: Settings = Depends(settings_dep),
) -> Job:
    """Cancel a job: a queued or paused one at once (a paused one's checkpoints are deleted), a running one within
    one training step."""
    _owned_job(store, tenant, job_id)
    outcome, previous = store.request_cancel(job_id)
    if outcome == "missing":
        raise not_found("job", job_id, "job_id")
    if outcome == "finished":
        raise APIError(409, "job_not_cancellable", f"the job has already {previous}; there is nothing to cancel",
                       param="job_id")
    if outcome == "cancelled" and previous == "paused":
        _remove_job_files(job_id, storage, settings)
    return public_job(_owned_job(store, tenant, job_id), store)


def _remove_job_files(job_id: str, storage: Storage, settings: Settings) -> None:
    """Delete everything a job stored: its artifacts and checkpoints, and with local storage its working directory."""
    storage.delete_prefix(job_prefix(job_id))
    if settings.storage == "local":
        import shutil

        shutil.rmtree(work_dir(settings, job_id), ignore_errors=True)


@router.post("/{job_id}/pause", response_model=Job, responses=_ERRORS)
def pause_job(job_id: str, tenant: str = Depends(get_tenant), store: Store = Depends(get_store)) -> Job:
    """Pause a running job: it stops at its next checkpoint and becomes ``paused``, that checkpoint kept (until then
    it stays ``running``, with ``pause_requested: true``). A job that ends before its next checkpoint ends as usual."""
    _owned_job(store, tenant, job_id)
    outcome, status = store.request_pause(job_id)
    if outcome == "missing":
        raise not_found("job", job_id, "job_id")
    if outcome == "refused":
        hint = {"queued": "; a queued job can be cancelled instead", "validating_files": "; pause it once it is "
                "running (training started)", "paused": "; it is already paused: resume it with POST "
                f"/v1/fine_tuning/jobs/{job_id}/resume"}.get(status, "")
        raise APIError(400, "job_not_running", f"only a running job can be paused; this one is {status}{hint}",
                       param="job_id")
    return public_job(_owned_job(store, tenant, job_id), store)


@router.post("/{job_id}/resume", response_model=Job, responses=_ERRORS)
def resume_job(job_id: str, tenant: str = Depends(get_tenant), store: Store = Depends(get_store)) -> Job:
    """Resume a paused job: it is queued again and continues from the checkpoint it paused at."""
    _owned_job(store, tenant, job_id)
    outcome, status = store.resume(job_id)
    if outcome == "missing":
        raise not_found("job", job_id, "job_id")
    if outcome == "refused":
        hint = "; pause it first (POST .../pause)" if status == "running" else ""
        raise APIError(400, "job_not_paused", f"only a paused job can be resumed; this one is {status}{hint}",
                       param="job_id")
    try:
        enqueue(job_id)
    except Exception as exc:
        log.exception("job %s: could not send its task", job_id)
        error = {"code": "queue_unavailable", "param": None,
                 "message": "the job could not be queued again (the broker did not answer); resume it again"}
        store.transition(job_id, "paused", from_=["queued"],
                         event=status_event("paused", error["message"], level="error"))
        raise APIError(503, "queue_unavailable", error["message"]) from exc
    return public_job(_owned_job(store, tenant, job_id), store)


@router.delete("/{job_id}", response_model=Deleted, responses={**_ERRORS, 409: {"model": ErrorResponse}})
def delete_job(
    job_id: str,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
    settings: Settings = Depends(settings_dep),
) -> Deleted:
    """Delete a finished job with its adapter, report and events."""
    job = _owned_job(store, tenant, job_id)
    if job["status"] not in TERMINAL:
        raise APIError(409, "job_not_finished",
                       f"the job is {job['status']}; cancel it (POST /jobs/{job_id}/cancel) and delete it once it "
                       "has stopped", param="job_id")
    _remove_job_files(job_id, storage, settings)
    if not job.get("artifacts_deleted") and job.get("adapter_bytes"):
        store.add_usage(tenant, -int(job["adapter_bytes"]))
    store.delete_job(job_id)
    return Deleted(id=job_id, object="fine_tuning.job", deleted=True)


@router.get("/{job_id}/events", response_model=EventList, responses={
    **_ERRORS, 429: {"model": ErrorResponse}, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                     "description": "JSON page of events, or with Accept: text/event-stream a live stream"}})
async def list_events(
    job_id: str,
    request: Request,
    after: str | None = Query(None, max_length=64, description="/jobs: a seq, only events with seq above it (oldest "
                              "first). /v1/fine_tuning/jobs: an event id, only events older than it (newest first)."),
    limit: int = Query(100, ge=1, le=1000),
    stream: bool = Query(False, description="Stream as server-sent events (same as Accept: text/event-stream)."),
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    settings: Settings = Depends(settings_dep),
):
    """The job's events, oldest first; a live SSE stream (ending when the job ends) when asked for.

    Under OpenAI's path a JSON page is newest first, in OpenAI's shape (:func:`openai_event`), ``after`` an event id.
    """
    await run_in_threadpool(_owned_job, store, tenant, job_id)
    openai = _openai_route(request)
    wants_stream = stream or "text/event-stream" in request.headers.get("accept", "")
    if openai and not wants_stream:
        before = _event_cursor(after, openai=True)
        if before == 0:
            return EventList(data=[], has_more=False)
        events, has_more = await run_in_threadpool(store.list_events_newest_first, job_id, before=before, limit=limit)
        return EventList(data=[openai_event(job_id, e) for e in events], has_more=has_more)
    after = _event_cursor(after, openai=openai) or 0
    if wants_stream:
        start = after
        if last_event_id and last_event_id.strip().isdigit():
            resume = int(last_event_id.strip())
            if resume > MAX_EVENT_SEQ:
                raise APIError(400, "invalid_request", f"Last-Event-ID {last_event_id.strip()[:40]} is not the seq of "
                               "an event (event ids are whole numbers up to 2^63-1); send the id of the last event "
                               "received, or none to start from the first", param="Last-Event-ID")
            start = max(start, resume)
        slot = STREAMS.admit(tenant, per_tenant=settings.max_streams_per_tenant,
                             per_process=settings.max_streams_per_process)
        return StreamingResponse(_sse(store, job_id, start, slot), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(slot.release))
    events, has_more = await run_in_threadpool(store.list_events, job_id, after=after, limit=limit)
    return EventList(data=events, has_more=has_more)


def _openai_route(request: Request) -> bool:
    """Whether the request came in under OpenAI's ``/v1/fine_tuning/jobs`` (the router is mounted at both)."""
    path = request.scope.get("path", "").removeprefix(request.scope.get("root_path", ""))
    return path.startswith(OPENAI_PREFIX)


def _event_cursor(after: str | None, *, openai: bool) -> int | None:
    """The seq in ``after``: our seq (``/jobs``), or under OpenAI's path an event id (``ftevent-...``) or a seq."""
    if after is None or after == "":
        return None
    seq = event_seq(after) if openai else (int(after) if after.isascii() and after.strip().isdigit() else None)
    if seq is None or seq > MAX_EVENT_SEQ:
        what = "an event id (ftevent-...) or seq" if openai else "the seq of an event (a whole number up to 2^63-1)"
        raise APIError(400, "invalid_request", f"after: '{after[:64]}' is not {what}; pass the id of the last event "
                       "of the previous page", param="after")
    return seq


def openai_event(job_id: str, event: dict) -> dict:
    """An event in OpenAI's shape (``ftevent-`` id, ``type`` ``message`` or ``metrics``, ``level`` info/warn/error),
    our own fields beside it: ``seq``, ``event_type`` (our type: ``status``, ``progress``, ...) and ``data``.

    A training step's ``progress`` event is a ``metrics`` event whose ``data`` holds OpenAI's ``step``,
    ``train_loss`` and ``total_steps`` with ours (``stage``, ``loss``, ``routing_loss``, ``lr``, ...).
    """
    data = dict(event.get("data") or {})
    kind = "message"
    if event["type"] == "progress" and data.get("stage") in TRAINING_STAGES and data.get("loss") is not None:
        kind = "metrics"
        data.update(step=data.get("step"), train_loss=data["loss"], total_steps=data.get("total_steps"))
    level = event.get("level", "info")
    return {**event, "id": event_id(job_id, event["seq"]), "type": kind, "event_type": event["type"],
            "level": "warn" if level == "warning" else level, "data": data}


def _stored_checkpoints(job_id: str, storage: Storage, settings: Settings) -> set[str]:
    """Names of the job's checkpoints whose files are there: in the working directory (local storage) or, copied by
    S3 workers, in the bucket."""
    if settings.storage == "local":
        root = work_checkpoints_dir(settings, job_id)
        return {p.parent.name for p in root.glob("*/meta.json")} if root.is_dir() else set()
    prefix = checkpoints_prefix(job_id)
    return {o.key[len(prefix):].split("/")[0] for o in storage.list(prefix) if o.key.endswith("/meta.json")}


def _checkpoint_name(record: dict) -> str:
    return record.get("name") or record["id"].split("-", 2)[-1]


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=_ERRORS)
def list_checkpoints(
    job_id: str,
    request: Request,
    after: str | None = Query(None, description="A checkpoint id: list the ones after it."),
    limit: int = Query(10, ge=1, le=100),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
    settings: Settings = Depends(settings_dep),
) -> CheckpointList:
    """Checkpoints the job wrote, newest first, with OpenAI's ``fine_tuned_model_checkpoint`` and
    ``metrics.train_loss``. They are resume state: the engine keeps stage boundaries and the newest periodic one,
    and removes them all when the job ends. ``/jobs`` lists every one recorded; OpenAI's path only those whose files
    are still there (a paused job's, for one)."""
    job = _owned_job(store, tenant, job_id)
    # Newest first by training position, not by when the worker's watcher happened to record them (it may find
    # two in one scan); at one step, a stage boundary comes after the periodic checkpoint it follows.
    records = sorted(store.list_checkpoints(job_id), reverse=True,
                     key=lambda r: (r["step_number"], r.get("kind") == "boundary", r.get("created_at") or 0))
    if _openai_route(request):
        there = _stored_checkpoints(job_id, storage, settings)
        records = [r for r in records if _checkpoint_name(r) in there]
    model = job.get("fine_tuned_model") or fine_tuned_model_id(job["model"], job.get("suffix"), job_id)
    for r in records:
        r["fine_tuned_model_checkpoint"] = checkpoint_model_id(model, r["step_number"])
        metrics = r.setdefault("metrics", {})
        metrics.setdefault("train_loss", metrics.get("loss"))
        metrics["step"] = r["step_number"]
    if after:
        ids = [r["id"] for r in records]
        records = records[ids.index(after) + 1:] if after in ids else []
    return CheckpointList(data=records[:limit], has_more=len(records) > limit)


@router.get("/{job_id}/adapter", response_class=StreamingResponse, responses={
    **_ERRORS, 409: {"model": ErrorResponse}, 410: {"model": ErrorResponse},
    200: {"content": {"application/gzip": {}}, "description": "the adapter directory as .tar.gz"}})
def download_adapter(
    job_id: str,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
) -> StreamingResponse:
    """The adapter directory as a streamed ``.tar.gz`` (weights, config, importance, report, model card)."""
    job = _ready_job(store, tenant, job_id)
    prefix = adapter_prefix(job_id)
    objects = [o for o in storage.list(prefix) if "checkpoints" not in o.key[len(prefix):].split("/")]
    # The archive's top directory is named like the job's out_dir, so the model card's paths hold.
    root = job["id"]
    return StreamingResponse(
        stream_tar_gz(storage, objects, prefix, root),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{root}.tar.gz"'},
    )


@router.get("/{job_id}/report", responses={**_ERRORS, 409: {"model": ErrorResponse}, 200: {
    "content": {"application/json": {}, "text/markdown": {}}, "description": "the evaluation report"}})
def get_report(
    job_id: str,
    format: str = Query("json", pattern="^(json|md)$"),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
):
    """The job's evaluation report (tool accuracy, general retention) as JSON or Markdown."""
    _ready_job(store, tenant, job_id)
    key = adapter_prefix(job_id) + ("report.json" if format == "json" else "report.md")
    if not storage.exists(key):
        raise APIError(404, "report_not_found", "this job has no evaluation report (its evaluation was turned "
                       "off or it had no test examples)", param="job_id")
    data = storage.get_bytes(key)
    if format == "md":
        return PlainTextResponse(data.decode("utf-8", "replace"), media_type="text/markdown")
    return json.loads(data)


def _ready_job(store: Store, tenant: str, job_id: str) -> dict:
    job = _owned_job(store, tenant, job_id)
    if job["status"] != "succeeded":
        raise APIError(409, "adapter_not_ready",
                       f"the job is {job['status']}; its adapter and report can be downloaded once it has succeeded "
                       f"(follow it with GET /jobs/{job_id}/events)", param="job_id")
    if job.get("artifacts_deleted"):
        raise APIError(410, "artifacts_expired", "this job's artifacts were deleted after the retention period",
                       param="job_id")
    return job


def _sse_message(event: dict) -> str:
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


class StreamSlot:
    """One admitted event stream; :meth:`release` gives its place back (once, however often it is called)."""

    def __init__(self, slots: StreamSlots, tenant: str):
        self.slots, self.tenant, self.held = slots, tenant, True

    def release(self) -> None:
        """Give the place back."""
        if self.held:
            self.held = False
            self.slots.release(self.tenant)


class StreamSlots:
    """The live event streams of this API process, in all and per tenant. Counted on the event loop (the
    stream route is async), so no lock is needed."""

    def __init__(self) -> None:
        self.total = 0
        self.by_tenant: dict[str, int] = {}

    def admit(self, tenant: str, *, per_tenant: int, per_process: int) -> StreamSlot:
        """A slot for a new stream, or a 429 (before the stream starts) when a limit is reached."""
        mine = self.by_tenant.get(tenant, 0)
        if mine >= per_tenant:
            raise APIError(429, "too_many_streams", f"this key already has {mine} live event streams open on this "
                           f"server, the most it may (CITI_MAX_STREAMS_PER_TENANT={per_tenant}); close one, or poll "
                           "GET /jobs/{id}/events with after=<last seq>", headers={"Retry-After": "5"})
        if self.total >= per_process:
            raise APIError(429, "too_many_streams", f"this server holds {self.total} live event streams, its limit "
                           f"(CITI_MAX_STREAMS_PER_PROCESS={per_process}); retry shortly, or poll "
                           "GET /jobs/{id}/events with after=<last seq>", headers={"Retry-After": "5"})
        self.total += 1
        self.by_tenant[tenant] = mine + 1
        return StreamSlot(self, tenant)

    def release(self, tenant: str) -> None:
        """One stream of ``tenant`` has ended."""
        self.total -= 1
        left = self.by_tenant.get(tenant, 1) - 1
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)


STREAMS = StreamSlots()


async def _sse(store: Store, job_id: str, after: int, slot: StreamSlot | None = None):
    """Events after ``after`` as SSE, live, until the job has ended and every event has been sent.

    A Redis error ends the stream cleanly with an ``error`` event (the client reconnects with
    ``Last-Event-ID`` and misses nothing); the stream's slot is given back however it ends."""
    try:
        async for message in _sse_events(store, job_id, after):
            yield message
    except RedisError as exc:
        log.warning("event stream of job %s ended: the job store is unavailable (%s)", job_id, exc)
        body = error_body(503, "service_unavailable", "the job store (Redis) is unavailable; reconnect with "
                          "Last-Event-ID in a few seconds")
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
    finally:
        if slot is not None:
            slot.release()


async def _sse_events(store: Store, job_id: str, after: int):
    last = after
    yield "retry: 2000\n\n"
    while True:
        events = await store.read_events_async(job_id, after=last, block_ms=None)
        if not events:
            status = await store.get_status_async(job_id)
            if status is None:
                return  # deleted meanwhile
            if status in TERMINAL:
                # The ending event may have been written between the read and the status check.
                events = await store.read_events_async(job_id, after=last, block_ms=None)
                if not events:
                    return
            else:
                events = await store.read_events_async(job_id, after=last, block_ms=_SSE_BLOCK_MS)
                if not events:
                    yield ": keep-alive\n\n"
                    continue
        for event in events:
            last = event["seq"]
            yield _sse_message(event)
            if event["type"] == "status" and event.get("data", {}).get("status") in TERMINAL:
                return

