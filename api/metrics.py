"""Prometheus metrics: request latency (measured here), and job, queue and worker gauges read from the store
at scrape time (so every API replica reports the same numbers)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from citi_service.store import Store

REGISTRY = CollectorRegistry(auto_describe=True)

REQUEST_LATENCY = Histogram(
    "citi_http_request_duration_seconds",
    "Time from a request's arrival to its response headers, by route template, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class StoreCollector:
    """Jobs by status, queue depth and worker heartbeats, read from the store on each scrape."""

    def __init__(self, store_factory):
        self._store_factory = store_factory

    def collect(self):
        store: Store = self._store_factory()
        jobs = GaugeMetricFamily("citi_jobs", "Jobs by status.", labels=["status"])
        for status, n in store.status_counts().items():
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily("citi_queue_depth", "Jobs waiting for a worker.", value=store.queue_depth())
        beats = GaugeMetricFamily("citi_worker_last_heartbeat_seconds",
                                  "Unix time of each worker's last heartbeat.", labels=["worker"])
        age = GaugeMetricFamily("citi_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat.",
                                labels=["worker"])
        now = time.time()
        for name, info in sorted(store.workers().items()):
            beats.add_metric([name], info.get("ts", 0))
            age.add_metric([name], max(0.0, now - info.get("ts", 0)))
        yield beats
        yield age


def install_store_collector(store_factory) -> None:
    """Register the store gauges once per process."""
    if not getattr(install_store_collector, "_done", False):
        REGISTRY.register(StoreCollector(store_factory))
        install_store_collector._done = True


def render() -> tuple[bytes, str]:
    """The metrics page and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (``/jobs/{job_id}/events``), or ``unmatched``.

    FastAPI puts the route itself in the scope, whose path lacks the prefix its router was included
    under (the job routes are included twice, at ``/jobs`` and ``/v1/fine_tuning/jobs``); that prefix
    is the part of the request path in front of what the route's own pattern matches.
    """
    route = scope.get("route")
    template, pattern = getattr(route, "path", None), getattr(route, "path_regex", None)
    if template is None:
        return "unmatched"
    path = scope.get("path", "")
    if pattern is None or pattern.match(path):
        return template
    for cut in [i for i, ch in enumerate(path) if ch == "/"] + [len(path)]:
        if pattern.match(path[cut:]):
            return path[:cut] + template
    return template


class LatencyMiddleware:
    """Observe each HTTP request's time to response headers, labelled by its route template."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                REQUEST_LATENCY.labels(route_template(scope), scope["method"], str(message["status"])).observe(
                    time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, timed_send)
