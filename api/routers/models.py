"""``/v1/models``: the base models this service allows and the caller's fine-tuned adapters; deleting one.

Deleting a fine-tuned model deletes its job's result files too (``GET /v1/files`` no longer lists them).

Shapes follow OpenAI's models API (``{"object": "list", "data": [{"id", "object": "model", "created",
"owned_by"}]}``). A fine-tuned model is listed for the tenant that made it only; ``model`` in
``POST /v1/chat/completions`` accepts exactly the ids listed here.
"""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Depends

from api.deps import get_storage, get_store, get_tenant, settings_dep
from api.model_access import allowed_base_models, model_not_found
from api.schemas import Deleted, ErrorResponse
from citi_service.errors import APIError
from citi_service.keys import job_prefix, work_dir
from citi_service.model_access import base_model_allowed
from citi_service.settings import Settings
from citi_service.storage import Storage
from citi_service.store import Store

router = APIRouter(tags=["models"])

BASE_OWNER = "citi"


def _base_entry(spec: str) -> dict:
    return {"id": spec, "object": "model", "created": 0, "owned_by": BASE_OWNER}


def _adapter_entry(job: dict) -> dict:
    return {
        "id": job["fine_tuned_model"],
        "object": "model",
        "created": int(job.get("finished_at") or job.get("created_at") or 0),
        "owned_by": job.get("organization_id") or job.get("tenant") or "user",
        "root": job.get("model"),
        "parent": job.get("parent_model") or job.get("model"),  # the ft: model a continuation was trained from
        "job_id": job.get("id"),
    }


def tenant_adapters(store: Store, tenant: str) -> list[dict]:
    """The tenant's succeeded jobs that have a fine-tuned model, newest first."""
    jobs: list[dict] = []
    after = None
    while True:
        page, more = store.list_jobs(tenant, after=after, limit=100, status="succeeded")
        jobs += [j for j in page if j.get("fine_tuned_model") and not j.get("artifacts_deleted")]
        if not more or not page:
            return jobs
        after = page[-1]["id"]


@router.get("/v1/models", summary="List the models this key may use")
def list_models(tenant: str = Depends(get_tenant), store: Store = Depends(get_store),
                settings: Settings = Depends(settings_dep)) -> dict:
    """Base models allowed on this service, then the caller's fine-tuned models (newest first)."""
    data = [_base_entry(spec) for spec in allowed_base_models(settings)]
    data += [_adapter_entry(job) for job in tenant_adapters(store, tenant)]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}", summary="Retrieve one model")
def retrieve_model(model: str, tenant: str = Depends(get_tenant), store: Store = Depends(get_store),
                   settings: Settings = Depends(settings_dep)) -> dict:
    """One model by id: a base model this service allows or one of the caller's fine-tuned models."""
    job = store.get_job_by_model(tenant, model)
    if job is not None:
        return _adapter_entry(job)
    if base_model_allowed(model, settings):
        return _base_entry(model)
    raise model_not_found(model)


@router.delete("/v1/models/{model:path}", summary="Delete a fine-tuned model", response_model=Deleted,
               responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
def delete_model(model: str, tenant: str = Depends(get_tenant), store: Store = Depends(get_store),
                 storage: Storage = Depends(get_storage), settings: Settings = Depends(settings_dep)) -> Deleted:
    """Delete one of the caller's fine-tuned models: its adapter and report, as ``DELETE /jobs/{id}`` does. The job
    stays listed (with ``artifacts_deleted: true``); the model leaves ``GET /v1/models`` and chat."""
    job = store.remove_model(tenant, model)
    if job is None:
        if base_model_allowed(model, settings):
            raise APIError(403, "model_not_deletable", f"'{model}' is a base model of this service; only fine-tuned "
                           "models (ft:...) can be deleted", param="model")
        raise model_not_found(model)
    storage.delete_prefix(job_prefix(job["id"]))
    if settings.storage == "local":
        shutil.rmtree(work_dir(settings, job["id"]), ignore_errors=True)
    if job.get("adapter_bytes"):
        store.add_usage(tenant, -int(job["adapter_bytes"]))
    return Deleted(id=model, object="model", deleted=True)
