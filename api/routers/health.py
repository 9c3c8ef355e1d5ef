"""``/healthz`` (no auth: for load balancers and compose healthchecks) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from api import metrics
from api.deps import get_store, get_tenant
from api.schemas import Health
from citi_engine import __version__
from citi_service.store import Store

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(store: Store = Depends(get_store)):
    """``ok`` when Redis answers, else 503 ``degraded``."""
    redis_ok = store.ping()
    body = Health(status="ok" if redis_ok else "degraded", redis=redis_ok, version=__version__)
    return JSONResponse(body.model_dump(), status_code=200 if redis_ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus_metrics(tenant: str = Depends(get_tenant)) -> Response:
    """Prometheus metrics: jobs by status, queue depth, request latency, worker heartbeats."""
    data, content_type = await run_in_threadpool(metrics.render)
    return Response(data, media_type=content_type)
