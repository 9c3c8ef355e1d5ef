"""Fine-tuning jobs: one router, which ``api/main.py`` mounts at ``/jobs`` and at OpenAI's ``/v1/fine_tuning/jobs``.

A job is checked completely at submit time with the engine's own torch-free rules (model spec, files,
budget, components, hyperparameters), stored as ``queued`` and sent to the workers as one task carrying
only its id (:func:`citi_service.queue.enqueue`). Everything after that (status, phase, progress,
events, the adapter) comes from the store and the artifact storage, written by the worker.
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
from citi_service.keys import adapter_prefix, file_key, job_prefix, work_dir
from citi_service.model_access import check_model
from citi_service.queue import enqueue
from citi_service.records import TERMINAL, status_event
from citi_service.settings import Settings
from citi_service.storage import Storage
from citi_service.store import IdempotencyConflict, LimitExceeded, Store

log = logging.getLogger("citi.api")

_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
_SSE_BLOCK_MS = 5000
MAX_EVENT_SEQ = 2**63 - 1  # event seqs are Redis stream ids' first part; larger values are no event's
_METADATA_MAX = (16, 64, 512)


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

_INTERNAL = ("tenant", "seq", "worker", "engine", "adapter_bytes", "has_report", "started_at", "general_file_record")


def public_job(job: dict, store: Store) -> Job:
    """The API form of a job record."""
    d = {k: v for k, v in job.items() if k not in _INTERNAL}
    job_id, status = job["id"], job["status"]
    d["organization_id"] = job["tenant"]
    hyper, method = d.get("hyperparameters") or {}, (d.get("method") or {}).get("type")
    if hyper and "n_epochs" not in hyper and method in ("citi", "lora", "full"):  # stored before they were recorded
        d["hyperparameters"] = {**hyper, **openai_view(method, hyper)}
    d["queue_position"] = store.queue_position(job_id) if status == "queued" else None
    d["events_url"] = f"/jobs/{job_id}/events"
    available = status == "succeeded" and not job.get("artifacts_deleted")
    d["adapter_url"] = f"/jobs/{job_id}/adapter" if available else None
    d["report_url"] = f"/jobs/{job_id}/report" if available and job.get("has_report") else None
    return Job(**d)


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
    """Create a fine-tuning job. With an ``Idempotency-Key`` header a retried request returns the same job."""
    check_model(body.model, settings)
    _check_file(store, tenant, body.training_file, "training_file", training=True)
    _check_file(store, tenant, body.validation_file, "validation_file", training=False)
    _check_file(store, tenant, body.general_file, "general_file", training=True)
    _check_metadata(body.metadata)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - 1)
    cfg = engine_config(body, settings, seed=seed)  # every setting finite and in range before anything else
    method_record: dict[str, Any] = {"type": cfg.method, "hyperparameters": asdict(cfg.hyperparameters)}
    if body.method and body.method.type == "supervised":  # OpenAI's shape beside ours: the type that ran is citi
        method_record["supervised"] = {"hyperparameters": openai_hyperparameters(cfg)}
    body_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    job_id = "ftjob-" + secrets.token_hex(12)
    record = {
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

    resolved = check_model(body.model, settings)
    record = _check_file(store, tenant, body.training_file, "training_file", training=True)
    _check_file(store, tenant, body.validation_file, "validation_file", training=False)
    general = _check_file(store, tenant, body.general_file, "general_file", training=True)
    cfg = engine_config(body, settings, seed=body.seed or 0)
    examples = _read_examples(storage, body.training_file)
    n_tool, n_general = record["n_tool"], record["n_general"]
    if general is not None:
        examples += _read_examples(storage, body.general_file)
        n_general += general["n_examples"]
    device = "cpu" if (settings.device or "").startswith("cpu") else "gpu"
    gpus = settings.gpus_per_job
    if gpus is None and (settings.device or "").startswith("cuda:"):
        gpus = 1  # the workers train on the one GPU CITI_DEVICE names
    result = estimate(cfg, resolved=resolved, examples=examples, n_tool=n_tool, n_general=n_general,
                      has_validation_file=body.validation_file is not None, device=device,
                      gpu_memory_gb=settings.gpu_memory_gb, gpus=gpus)
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
def cancel_job(job_id: str, tenant: str = Depends(get_tenant), store: Store = Depends(get_store)) -> Job:
    """Cancel a job: a queued one at once, a running one within one training step."""
    _owned_job(store, tenant, job_id)
    outcome, previous = store.request_cancel(job_id)
    if outcome == "missing":
        raise not_found("job", job_id, "job_id")
    if outcome == "finished":
        raise APIError(409, "job_not_cancellable", f"the job has already {previous}; there is nothing to cancel",
                       param="job_id")
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
    storage.delete_prefix(job_prefix(job_id))
    if settings.storage == "local":
        import shutil

        shutil.rmtree(work_dir(settings, job_id), ignore_errors=True)
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
    after: int = Query(0, ge=0, le=MAX_EVENT_SEQ, description="Only events with seq above this."),
    limit: int = Query(100, ge=1, le=1000),
    stream: bool = Query(False, description="Stream as server-sent events (same as Accept: text/event-stream)."),
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    settings: Settings = Depends(settings_dep),
):
    """The job's events, oldest first; a live SSE stream (ending when the job ends) when asked for."""
    await run_in_threadpool(_owned_job, store, tenant, job_id)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
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


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=_ERRORS)
def list_checkpoints(
    job_id: str,
    after: str | None = Query(None, description="A checkpoint id: list the ones after it."),
    limit: int = Query(10, ge=1, le=100),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
) -> CheckpointList:
    """Checkpoints the job wrote, newest first (they are resume state, removed when the job ends)."""
    _owned_job(store, tenant, job_id)
    records = list(reversed(store.list_checkpoints(job_id)))
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


def _read_examples(storage: Storage, file_id: str) -> list[dict]:
    out = []
    for line in storage.get_bytes(file_key(file_id)).split(b"\n"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


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

