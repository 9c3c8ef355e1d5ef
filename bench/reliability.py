"""Reliability benchmark: a bounded load test on loopback plus the fault and fuzz numbers of
``tests/reliability``, written to ``bench/results/reliability.json`` and ``reliability.md``.

    .venv/bin/python bench/reliability.py                      # faults + load (200 clients, 60 s)
    .venv/bin/python bench/reliability.py --skip-faults --clients 50 --seconds 10
    .venv/bin/python bench/reliability.py --skip-faults --skip-load          # only the 300-stream load
    .venv/bin/python bench/reliability.py --skip-faults --skip-load --skip-streams   # upload memory + hostile settings

Load: a private redis-server (no persistence), one ``uvicorn api.main:app`` process with the rate limit
raised far above what the driver can send (so the service is measured, not the limiter), the inference
server on a tiny random Llama for chat, and no training workers (created jobs stay queued; the job routes
still read and write the store as under real use). An asyncio httpx driver runs ``--clients`` clients,
each looping over a weighted mix of create / list / get / events / chat for ``--seconds``. 5xx and 429 are
counted apart; latency percentiles are per route; the API's resident memory is read before and after.

Upload memory: one 71 MB JSONL file of large tool schemas (valid lines) uploaded to one API process; its
resident memory at rest and at its peak during the upload (``VmHWM`` and 50 ms samples).

Hostile settings: the out-of-range and non-finite settings, query values, headers and bodies of the hardening
issue, sent to one API process with one Celery worker; each answer's status, code and param, and whether the
worker is still free afterwards (a small job queued before them and one submitted after them both succeed).

Faults: ``pytest tests/reliability`` with ``CITI_RELIABILITY_OUT`` set, so each fault test writes how many
jobs went through it and how many were lost (see ``tests/reliability/conftest.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from provenance import commit

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "2-core CPU dev machine"
KEY = "sk-load-0123456789"
# Weights of the request mix (chat is dropped when the inference server does not answer).
MIX = {"create": 1, "list": 3, "get": 4, "events": 3, "chat": 1}
FAULTS = ("worker_kill", "redis_restart", "api_restart", "duplicate_delivery", "wedged_job")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- load -----------------------------------------------------------------------------------------


class Tally:
    """Counts and latencies of every request, by route."""

    def __init__(self) -> None:
        self.latency_ms: dict[str, list[float]] = {}
        self.status: dict[str, dict[int, int]] = {}
        self.transport_errors: dict[str, int] = {}

    def add(self, route: str, status: int, ms: float) -> None:
        self.latency_ms.setdefault(route, []).append(ms)
        by = self.status.setdefault(route, {})
        by[status] = by.get(status, 0) + 1

    def count(self, predicate) -> int:
        return sum(n for by in self.status.values() for code, n in by.items() if predicate(code))


async def _client(i: int, url: str, state: dict, tally: Tally, stop_at: float, mix: dict[str, int]) -> None:
    rnd = random.Random(i)
    routes, weights = list(mix), list(mix.values())
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(60)) as c:
        while time.monotonic() < stop_at:
            route = rnd.choices(routes, weights)[0]
            job_id = rnd.choice(state["jobs"])
            start = time.perf_counter()
            try:
                if route == "create":
                    r = await c.post("/jobs", json=state["job_body"])
                    if r.status_code == 200:
                        state["jobs"].append(r.json()["id"])
                elif route == "list":
                    r = await c.get("/jobs", params={"limit": 20})
                elif route == "get":
                    r = await c.get(f"/jobs/{job_id}")
                elif route == "events":
                    r = await c.get(f"/jobs/{job_id}/events", params={"limit": 100})
                else:
                    r = await c.post("/v1/chat/completions", json=state["chat_body"])
                tally.add(route, r.status_code, (time.perf_counter() - start) * 1000)
            except httpx.HTTPError:
                tally.transport_errors[route] = tally.transport_errors.get(route, 0) + 1


def run_load(clients: int, seconds: float, workdir: Path) -> dict:
    """Start Redis, the API and the inference server; drive them; return the load section."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from citi_engine.testing import make_tiny_model_dir
    from tests.service.conftest import to_jsonl, training_lines

    model = make_tiny_model_dir(workdir / "models" / "tiny-llama")
    redis_port, api_port, inf_port = _free_port(), _free_port(), _free_port()
    procs: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITI_", "AWS_"))}
    env.update({
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "CITI_ARTIFACT_DIR": str(workdir / "artifacts"),
        "CITI_API_KEYS": f"load:{KEY}", "CITI_MODEL_DIRS": str(Path(model).parent), "CITI_STORAGE": "local",
        "CITI_DEVICE": "cpu", "CITI_INFERENCE_DEVICE": "cpu", "CITI_INFERENCE_URL": f"http://127.0.0.1:{inf_port}",
        "CITI_INFERENCE_TOKEN": secrets.token_urlsafe(24),  # the inference server does not start without one
        # Raised so the limiter never answers: the load measures the service.
        "CITI_RATE_LIMIT_PER_MINUTE": "100000000", "CITI_MAX_ACTIVE_JOBS_PER_TENANT": "100000000",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    try:
        redis_log = workdir / "redis.log"
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--logfile", str(redis_log)], start_new_session=True))
        api_log, inf_log = workdir / "api.log", workdir / "inference.log"
        with open(api_log, "ab") as out:
            api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                                    str(api_port), "--log-level", "warning"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(api)
        with open(inf_log, "ab") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "worker.inference.app:app", "--host",
                                           "127.0.0.1", "--port", str(inf_port), "--log-level", "warning"], cwd=ROOT,
                                          env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{api_port}"
        _wait_http(url + "/healthz", api, api_log)
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(url + "/v1/files", headers=headers, files={"file": ("t.jsonl", to_jsonl(training_lines()))},
                       data={"purpose": "fine-tune"}, timeout=60)
        r.raise_for_status()
        job_body = {"model": model, "training_file": r.json()["id"], "budget": {"max_steps": 3}}
        first = httpx.post(url + "/jobs", headers=headers, json=job_body, timeout=60)
        first.raise_for_status()
        chat_body = {"model": model, "max_tokens": 4, "temperature": 0,
                     "messages": [{"role": "user", "content": "What's the weather in Paris?"}]}
        chat_note = "chat on the tiny model through the inference server (max_tokens 4)"
        try:
            _wait_http(f"http://127.0.0.1:{inf_port}/healthz", procs[-1], inf_log)
            warm = httpx.post(url + "/v1/chat/completions", headers=headers, json=chat_body, timeout=120)
            chat_ok = warm.status_code == 200
            if not chat_ok:
                chat_note = f"chat left out: a preflight request answered {warm.status_code}: {warm.text[:300]}"
        except RuntimeError as exc:
            chat_ok, chat_note = False, f"chat left out: the inference server did not start ({str(exc)[:300]})"
        mix = dict(MIX) if chat_ok else {k: v for k, v in MIX.items() if k != "chat"}

        rss_before = _rss_mb(api.pid)
        tally = Tally()
        state = {"jobs": [first.json()["id"]], "job_body": job_body, "chat_body": chat_body}

        rss_trend: list[float] = []

        async def sample_rss(stop_at: float) -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(seconds / 6)
                rss_trend.append(round(_rss_mb(api.pid), 1))

        async def drive() -> None:
            stop_at = time.monotonic() + seconds
            await asyncio.gather(sample_rss(stop_at),
                                 *[_client(i, url, state, tally, stop_at, mix) for i in range(clients)])

        started = time.perf_counter()
        asyncio.run(drive())
        elapsed = time.perf_counter() - started
        time.sleep(2)
        rss_after = _rss_mb(api.pid)
        requests = sum(len(v) for v in tally.latency_ms.values())
        return {
            "clients": clients, "seconds": seconds, "elapsed_s": round(elapsed, 1), "requests": requests,
            "requests_per_s": round(requests / elapsed, 1),
            "server_errors": tally.count(lambda s: s >= 500), "rate_limited": tally.count(lambda s: s == 429),
            "other_4xx": tally.count(lambda s: 400 <= s < 500 and s != 429),
            "transport_errors": sum(tally.transport_errors.values()),
            "p50_ms": {k: round(_percentile(v, 0.50), 1) for k, v in sorted(tally.latency_ms.items())},
            "p99_ms": {k: round(_percentile(v, 0.99), 1) for k, v in sorted(tally.latency_ms.items())},
            "requests_by_route": {k: len(v) for k, v in sorted(tally.latency_ms.items())},
            "status_by_route": {k: {str(s): n for s, n in sorted(v.items())} for k, v in sorted(tally.status.items())},
            "api_rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1), "during": rss_trend},
            "jobs_created": len(state["jobs"]), "chat": chat_note,
        }
    finally:
        for proc in reversed(procs):
            _stop(proc)


async def _hold_stream(client: httpx.AsyncClient, url: str, key: str, job_id: str, seconds: float) -> dict:
    """One SSE stream of a queued job, held ``seconds``: admitted or refused, and whether it was cut."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    try:
        async with client.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "cut": False}
            try:
                async with asyncio.timeout(seconds):
                    async for _ in r.aiter_raw():
                        pass
            except TimeoutError:
                return {"status": 200, "cut": False, "held_s": round(time.monotonic() - started, 1)}
            # The server ended an admitted stream of a job that is still queued: a cut.
            return {"status": 200, "cut": True, "held_s": round(time.monotonic() - started, 1)}
    except httpx.HTTPError as exc:
        return {"status": None, "cut": True, "error": type(exc).__name__,
                "held_s": round(time.monotonic() - started, 1)}


def run_streams(streams: int, seconds: float, workdir: Path, process_limit: int | None = None) -> dict:
    """``streams`` SSE streams held ``seconds`` on one API process, spread over tenants of at most 30 streams
    each, and one other tenant's stream opened first and held throughout; with the shipped stream limits, or
    with the per-process limit set to ``process_limit``."""
    sys.path.insert(0, str(ROOT))
    from tests.service.conftest import to_jsonl, training_lines

    per_tenant = 30
    tenants = [f"t{i}" for i in range(-(-streams // per_tenant))] + ["other"]
    keys = {t: f"sk-stream-{t}-0123456789" for t in tenants}
    extra = {"CITI_API_KEYS": ",".join(f"{t}:{k}" for t, k in keys.items()),
             "CITI_RATE_LIMIT_PER_MINUTE": "100000000"}
    if process_limit is not None:
        extra["CITI_MAX_STREAMS_PER_PROCESS"] = str(process_limit)
    procs: list[subprocess.Popen] = []
    try:
        procs, api, url, _, api_log = _private_service(workdir, "stream", extra)
        jobs = {}
        for tenant, key in keys.items():
            headers = {"Authorization": f"Bearer {key}"}
            f = httpx.post(url + "/v1/files", headers=headers, files={"file": ("t.jsonl", to_jsonl(training_lines()))},
                           data={"purpose": "fine-tune"}, timeout=60)
            f.raise_for_status()
            job = httpx.post(url + "/jobs", headers=headers, timeout=60, json={
                "model": "smollm2-135m-instruct", "training_file": f.json()["id"], "budget": {"max_steps": 3}})
            job.raise_for_status()
            jobs[tenant] = job.json()["id"]
        rss_before = _rss_mb(api.pid)

        async def drive() -> tuple[dict, list[dict]]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            timeout = httpx.Timeout(30.0, read=seconds + 30)
            async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
                other = asyncio.create_task(_hold_stream(client, url, keys["other"], jobs["other"], seconds + 5))
                await asyncio.sleep(1.0)
                owners = [tenants[i // per_tenant] for i in range(streams)]
                results = await asyncio.gather(*[_hold_stream(client, url, keys[t], jobs[t], seconds) for t in owners])
                return await other, list(results)

        started = time.perf_counter()
        other, results = asyncio.run(drive())
        elapsed = time.perf_counter() - started
        log = api_log.read_text(errors="replace")
        admitted = [r for r in results if r["status"] == 200]
        return {
            "streams": streams, "seconds": seconds, "tenants": len(tenants) - 1, "per_tenant": per_tenant,
            "process_limit": process_limit or "shipped (256)",
            "elapsed_s": round(elapsed, 1), "admitted": len(admitted),
            "refused_429": sum(r["status"] == 429 for r in results),
            "other_status": sorted({str(r["status"]) for r in results} - {"200", "429"}),
            "admitted_cut": sum(r["cut"] for r in admitted), "transport_errors": sum(r["status"] is None for r in results),
            "other_tenant_stream": other, "api_rss_mb": {"before": round(rss_before, 1), "after": round(_rss_mb(api.pid), 1)},
            "tracebacks_in_api_log": log.count("Traceback"),
        }
    finally:
        for proc in reversed(procs):
            _stop(proc)


# -- upload memory --------------------------------------------------------------------------------


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process so far (``VmHWM``), in MB."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def _private_service(workdir: Path, name: str, extra_env: dict | None = None,
                     model_root: Path | None = None) -> tuple[list[subprocess.Popen], subprocess.Popen, str, dict, Path]:
    """A private redis-server and one API process on free ports; returns (processes, api, url, env, api log)."""
    redis_port, api_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITI_", "AWS_"))}
    env.update({
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "CITI_ARTIFACT_DIR": str(workdir / f"{name}-artifacts"),
        "CITI_API_KEYS": f"load:{KEY}", "CITI_STORAGE": "local", "CITI_RATE_LIMIT_PER_MINUTE": "0",
        "CITI_MODEL_DIRS": str(model_root or workdir), "CITI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    procs = [subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--logfile", str(workdir / f"{name}-redis.log")], start_new_session=True)]
    api_log = workdir / f"{name}-api.log"
    with open(api_log, "ab") as out:
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                                str(api_port), "--log-level", "warning"], cwd=ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(api)
    url = f"http://127.0.0.1:{api_port}"
    _wait_http(url + "/healthz", api, api_log)
    return procs, api, url, env, api_log


def run_upload(workdir: Path, megabytes: float = 71) -> dict:
    """Upload a ``megabytes`` MB JSONL file of large tool schemas (valid lines) to one API process with the
    shipped upload limit (100 MB); the API's resident memory at rest and at its peak during the upload."""
    sys.path.insert(0, str(ROOT))
    from tests.service.test_upload_streaming import tool_schema_lines

    lines = tool_schema_lines(int(megabytes * 2**20), distinct_tools=512, tools_per_line=24)
    data = b"".join(lines)
    procs, api, url, _, api_log = _private_service(workdir, "upload")
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        # The first upload imports the validator and jsonschema: resting memory is measured after it.
        warm = httpx.post(url + "/v1/files", headers=headers, files={"file": ("warm.jsonl", b"".join(lines[:20]))},
                          data={"purpose": "fine-tune"}, timeout=60)
        warm.raise_for_status()
        time.sleep(1)
        resting, peak_before = _rss_mb(api.pid), _peak_rss_mb(api.pid)
        samples: list[float] = []
        done = False

        async def sample() -> None:
            while not done:
                samples.append(_rss_mb(api.pid))
                await asyncio.sleep(0.05)

        async def upload() -> httpx.Response:
            nonlocal done
            try:
                async with httpx.AsyncClient(timeout=600) as client:
                    return await client.post(url + "/v1/files", headers=headers,
                                             files={"file": ("tools.jsonl", data)}, data={"purpose": "fine-tune"})
            finally:
                done = True

        async def both() -> httpx.Response:
            return (await asyncio.gather(upload(), sample()))[0]

        started = time.perf_counter()
        r = asyncio.run(both())
        elapsed = time.perf_counter() - started
        body = r.json()
        peak = max(_peak_rss_mb(api.pid), max(samples, default=0.0))
        return {
            "file_mb": round(len(data) / 2**20, 1), "lines": len(lines), "tools_per_line": 24,
            "distinct_tool_schemas": 512, "line_kb": round(len(data) / len(lines) / 1024, 1),
            "status": r.status_code, "n_examples": body.get("n_examples"),
            "error": (body.get("error") or {}).get("code"), "seconds": round(elapsed, 1),
            "api_rss_mb": {"resting": round(resting, 1), "peak": round(peak, 1),
                           "peak_before_upload": round(peak_before, 1), "growth": round(peak - resting, 1)},
            "target": "peak within +64 MB of resting",
            "tracebacks_in_api_log": api_log.read_text(errors="replace").count("Traceback"),
        }
    finally:
        for proc in reversed(procs):
            _stop(proc)


# -- hostile settings -----------------------------------------------------------------------------


def _hostile_requests(model: str, file_id: str, job_id: str) -> list[tuple[str, str, str, dict]]:
    """``(what, method, path, request keyword arguments)`` of every hostile request."""
    body = {"model": model, "training_file": file_id, "budget": {"max_steps": 3}, "seed": 1}

    def job(**override) -> dict:
        return {"json": {**body, **override}}

    def hyper(**values) -> dict:
        return job(method={"type": "citi", "hyperparameters": values})

    def raw(text: str) -> dict:
        return {"content": text.encode(), "headers": {"content-type": "application/json"}}

    plain = json.dumps({k: v for k, v in body.items() if k != "budget"})[:-1]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    sse = {"Accept": "text/event-stream"}
    return [
        ("budget.max_steps 1e30", "POST", "/jobs", job(budget={"max_steps": 1e30})),
        ("budget.max_steps 2^63", "POST", "/jobs", job(budget={"max_steps": 2**63})),
        ("hyperparameters.batch_size 1e12", "POST", "/jobs", hyper(batch_size=10**12)),
        ("hyperparameters.pack_tokens 2^40", "POST", "/jobs", hyper(pack_tokens=2**40)),
        ("hyperparameters.replay_examples 1e9", "POST", "/jobs", hyper(replay_examples=10**9)),
        ("components.num_experts 1e6", "POST", "/jobs", job(components={"num_experts": 10**6})),
        ("components.rank 2^20", "POST", "/jobs", job(components={"rank": 2**20})),
        ("hyperparameters.lr_molora 1e400 (infinity)", "POST", "/jobs",
         raw(plain + ', "method": {"type": "citi", "hyperparameters": {"lr_molora": 1e400}}}')),
        ("budget.max_seconds Infinity", "POST", "/jobs", raw(plain + ', "budget": {"max_seconds": Infinity}}')),
        ("budget.max_seconds NaN", "POST", "/jobs", raw(plain + ', "budget": {"max_seconds": NaN}}')),
        ("chat seed 2^63", "POST", "/v1/chat/completions", {"json": {**chat, "seed": 2**63}}),
        ("chat seed 1e30", "POST", "/v1/chat/completions", {"json": {**chat, "seed": 10**30}}),
        ("events after=1e30", "GET", f"/jobs/{job_id}/events", {"params": {"after": "1e30"}}),
        ("events after=10^30", "GET", f"/jobs/{job_id}/events", {"params": {"after": "1" + "0" * 30}}),
        ("events after=2^63 (stream)", "GET", f"/jobs/{job_id}/events",
         {"params": {"after": str(2**63), "stream": "true"}}),
        ("events Last-Event-ID 9x40", "GET", f"/jobs/{job_id}/events", {"headers": {**sse, "Last-Event-ID": "9" * 40}}),
        ("jobs ?status=bogus", "GET", "/jobs", {"params": {"status": "bogus"}}),
        ("jobs ?limit=1e30", "GET", "/jobs", {"params": {"limit": "1e30"}}),
        ("invalid JSON body (truncated)", "POST", "/jobs", raw('{"model": ')),
        ("invalid JSON body (not JSON)", "POST", "/jobs", raw("not json at all")),
        ("JSON body not an object", "POST", "/jobs", raw("[1, 2, 3]")),
        ("empty body", "POST", "/jobs", raw("")),
        ("invalid JSON body (chat)", "POST", "/v1/chat/completions", raw('{"messages": [')),
        ("invalid JSON body (estimate)", "POST", "/jobs/estimate", raw("{,}")),
    ]


def run_hostile(workdir: Path) -> dict:
    """The hostile settings of the hardening issue against a running API with one Celery worker: each
    request's status, error code and param; then a small normal job, which must still run to success."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from citi_engine.testing import make_tiny_model_dir
    from tests.service.conftest import TINY_HYPERPARAMETERS, to_jsonl, training_lines

    model = make_tiny_model_dir(workdir / "hostile-models" / "tiny-llama")
    procs, _, url, env, api_log = _private_service(workdir, "hostile", model_root=Path(model).parent)
    headers = {"Authorization": f"Bearer {KEY}"}
    worker_log = workdir / "hostile-worker.log"
    try:
        with open(worker_log, "ab") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-n", "hostile@bench",
                 "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            f = c.post("/v1/files", files={"file": ("t.jsonl", to_jsonl(training_lines()))},
                       data={"purpose": "fine-tune"})
            f.raise_for_status()
            small = {"model": model, "training_file": f.json()["id"], "budget": {"max_steps": 3}, "seed": 1,
                     "method": {"type": "citi", "hyperparameters": dict(TINY_HYPERPARAMETERS)}}
            first = c.post("/jobs", json=small)
            first.raise_for_status()
            jobs_before = len(c.get("/jobs", params={"limit": 100}).json()["data"])
            rows = []
            for what, method, path, kwargs in _hostile_requests(model, f.json()["id"], first.json()["id"]):
                r = c.request(method, path, **kwargs)
                try:
                    err = r.json().get("error") or {}
                except ValueError:
                    err = {}
                rows.append({"setting": what, "route": f"{method} {path.split('?')[0]}".replace(first.json()["id"],
                                                                                              "{id}"),
                             "status": r.status_code, "code": err.get("code"), "param": err.get("param")})
            jobs_after = len(c.get("/jobs", params={"limit": 100}).json()["data"])
            # The worker is still free: the job queued before them and one submitted after them both finish.
            started = time.perf_counter()
            after = c.post("/jobs", json=small)
            after.raise_for_status()
            outcome = {}
            deadline = time.time() + 300
            while time.time() < deadline:
                outcome = {j: c.get(f"/jobs/{j}").json()["status"] for j in (first.json()["id"], after.json()["id"])}
                if all(s in ("succeeded", "failed", "cancelled") for s in outcome.values()):
                    break
                time.sleep(0.5)
            followed_s = round(time.perf_counter() - started, 1)
        return {
            "requests": rows, "server_errors": sum(r["status"] >= 500 for r in rows),
            "jobs_created_by_them": jobs_after - jobs_before,
            "normal_jobs_after": list(outcome.values()), "normal_jobs_seconds": followed_s,
            "worker_free": all(s == "succeeded" for s in outcome.values()),
            "tracebacks_in_api_log": api_log.read_text(errors="replace").count("Traceback"),
        }
    finally:
        for proc in reversed(procs):
            _stop(proc)


# -- faults ---------------------------------------------------------------------------------------


def run_faults(workdir: Path) -> tuple[dict, dict, dict]:
    """Run tests/reliability; returns (faults, fuzz, pytest summary)."""
    out = workdir / "faults"
    env = {**os.environ, "CITI_RELIABILITY_OUT": str(out), "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    summary = {"command": "pytest -q tests/reliability", "exit_code": proc.returncode,
               "seconds": round(time.time() - started, 1),
               "result": (proc.stdout.strip().splitlines() or [""])[-1],
               "failed": [line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines()
                          if line.startswith("FAILED ")]}
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-3000:], file=sys.stderr)
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")} if out.is_dir() else {}
    faults = {name: records.get(name, {"jobs": 0, "lost": None, "note": "the test did not run or failed"})
              for name in FAULTS}
    fuzz = records.get("fuzz", {"schemathesis_cases": 0, "server_errors": None, "upload_cases": 0,
                                "upload_server_errors": None})
    return faults, fuzz, summary


# -- report ---------------------------------------------------------------------------------------


def write_markdown(result: dict, path: Path) -> None:
    """The human-readable companion of reliability.json."""
    lines = [f"# Reliability ({result['machine']})", "", f"Last run: commit `{result['commit']}`, {result['date']}.",
             ""]
    at = result.get("sections_measured_at") or {}
    if at:
        lines += ["Each section was measured at: " + "; ".join(f"{k} `{v}`" for k, v in at.items()) + ".", ""]
    load = result.get("load")
    if load:
        lines += ["## Load", "",
                  f"{load['clients']} concurrent clients for {load['seconds']} s on loopback (asyncio httpx driver, "
                  "one uvicorn process, private Redis, rate limit raised, no training workers): "
                  f"{load['requests']} requests ({load['requests_per_s']}/s), **{load['server_errors']} 5xx**, "
                  f"{load['rate_limited']} 429, {load['other_4xx']} other 4xx, {load['transport_errors']} transport "
                  f"errors. API RSS {load['api_rss_mb']['before']} MB before, {load['api_rss_mb']['after']} MB after "
                  f"(during: {', '.join(str(x) for x in load['api_rss_mb'].get('during', []))}); "
                  f"{load['jobs_created']} jobs created. {load['chat']}.", "",
                  "| route | requests | p50 ms | p99 ms | statuses |", "|---|---:|---:|---:|---|"]
        for route in load["p50_ms"]:
            statuses = ", ".join(f"{s}: {n}" for s, n in load["status_by_route"][route].items())
            lines.append(f"| {route} | {load['requests_by_route'][route]} | {load['p50_ms'][route]} | "
                         f"{load['p99_ms'][route]} | {statuses} |")
        lines += ["", "The driver runs on the same 2 cores as the API, the inference server and Redis (and this dev "
                  "machine is shared), so the latencies are those of a saturated host: they measure queueing "
                  "under 200 clients, not the cost of one request. Jobs are listed, read and streamed as JSON "
                  "pages (`GET /jobs/{id}/events`); with no workers they stay queued, so SSE streams would never end.",
                  ""]
    for st in result.get("streams") or []:
        o = st["other_tenant_stream"]
        lines += ["## Event streams" + (f" (per-process limit raised to {st['process_limit']})"
                                        if isinstance(st["process_limit"], int) else ""), "",
                  f"{st['streams']} SSE streams of queued jobs opened at once on one API process and held "
                  f"{st['seconds']:.0f} s, {st['per_tenant']} per tenant over {st['tenants']} tenants, per-process "
                  f"limit {st['process_limit']}, 32 per tenant: "
                  f"**{st['admitted']} admitted, {st['admitted_cut']} of them cut**, {st['refused_429']} refused with "
                  f"429 before the stream started, {st['transport_errors']} transport errors; another tenant's stream, "
                  f"opened first, {'held' if o.get('status') == 200 and not o.get('cut') else 'did NOT hold'} "
                  f"({o.get('held_s')} s). API RSS {st['api_rss_mb']['before']} MB before, "
                  f"{st['api_rss_mb']['after']} MB after; {st['tracebacks_in_api_log']} tracebacks in the API's log.",
                  ""]
    up = result.get("upload")
    if up:
        m = up["api_rss_mb"]
        lines += ["## Upload memory", "",
                  f"One {up['file_mb']} MB JSONL upload ({up['lines']} valid lines of {up['line_kb']} KB, each offering "
                  f"{up['tools_per_line']} large tool schemas drawn from {up['distinct_tool_schemas']}) to one API "
                  f"process with the shipped limits: **{up['status']}** ({up['n_examples']} examples) in "
                  f"{up['seconds']} s. API RSS **{m['resting']} MB resting, {m['peak']} MB at its peak during the "
                  f"upload (+{m['growth']} MB)**; target: {up['target']}. The body is spooled to disk by the "
                  "multipart parser, then checked and copied to storage a line at a time; "
                  f"{up['tracebacks_in_api_log']} tracebacks in the API's log.", ""]
    ho = result.get("hostile")
    if ho:
        lines += ["## Hostile settings", "",
                  "Each request against one API process with a private Redis and one Celery worker (tiny model, "
                  f"CPU): **{ho['server_errors']} 5xx**, {ho['jobs_created_by_them']} jobs created by them, "
                  f"{ho['tracebacks_in_api_log']} tracebacks in the API's log. The worker was "
                  f"{'still free' if ho['worker_free'] else 'NOT free'}: the small job queued before them and one "
                  f"submitted after them ended {', '.join(ho['normal_jobs_after'])} "
                  f"({ho['normal_jobs_seconds']} s).", "",
                  "| setting | route | status | code | param |", "|---|---|---:|---|---|"]
        for row in ho["requests"]:
            lines.append(f"| {row['setting']} | `{row['route']}` | {row['status']} | {row['code']} | "
                         f"{row['param']} |")
        lines.append("")
    faults = result.get("faults")
    if faults:
        tests = result["tests"]
        lines += ["## Faults", "", f"From `{tests['command']}`: {tests['result']} ({tests['seconds']} s)."
                  + (f" Failed: {', '.join(f'`{t}`' for t in tests['failed'])}." if tests.get("failed") else "")
                  + (f" {tests['note']}" if tests.get("note") else ""), "", "| fault | numbers |", "|---|---|"]
        for name, numbers in faults.items():
            lines.append(f"| {name} | " + ", ".join(f"{k} {v}" for k, v in numbers.items()) + " |")
        lines += ["", "Redis restart: the test's own redis-server with `appendonly yes`, `appendfsync always`, "
                  "killed with SIGKILL (not a graceful restart) while one job trained and one waited in the queue.",
                  "", "Wedged job: a training process stopped with SIGSTOP mid-training (no events, no exit, its lease "
                  "still renewed by its worker) is killed after CITI_JOB_STALL_SECONDS (20 s in the test), the job "
                  "fails with job_stalled, and the same worker runs the next job to success.",
                  "", "## Fuzz", "", ", ".join(f"{k} {v}" for k, v in result["fuzz"].items()), ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--skip-faults", action="store_true", help="only the load test")
    parser.add_argument("--skip-load", action="store_true", help="only the fault and fuzz tests")
    parser.add_argument("--streams", type=int, default=300, help="SSE streams held at once on one API process")
    parser.add_argument("--stream-seconds", type=float, default=60)
    parser.add_argument("--skip-streams", action="store_true", help="leave the stream load out")
    parser.add_argument("--skip-upload", action="store_true", help="leave the large-upload memory test out")
    parser.add_argument("--upload-mb", type=float, default=71, help="size of the upload of large tool schemas")
    parser.add_argument("--skip-hostile", action="store_true", help="leave the hostile settings out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    result: dict = {"commit": commit(short=True) or "unknown", "machine": MACHINE, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    previous = args.out / "reliability.json"
    if previous.is_file():  # a partial run keeps the other sections of the last full one
        kept = json.loads(previous.read_text())
        result.update({k: kept[k] for k in ("load", "streams", "upload", "hostile", "faults", "fuzz", "tests")
                       if k in kept})
        # Sections this run does not measure again keep the commit and date they were measured at.
        result["sections_measured_at"] = kept.get("sections_measured_at") or {
            k: f"{kept.get('commit')}, {kept.get('date')}" for k in ("load", "streams", "faults") if k in kept}
    measured_now = f"{result['commit']}, {result['date']}, {MACHINE}"
    result.setdefault("sections_measured_at", {})
    with tempfile.TemporaryDirectory(prefix="citi-reliability-") as tmp:
        if not args.skip_faults:
            result["faults"], result["fuzz"], result["tests"] = run_faults(Path(tmp))
            result["sections_measured_at"]["faults"] = measured_now
        if not args.skip_load:
            result["load"] = run_load(args.clients, args.seconds, Path(tmp))
            result["sections_measured_at"]["load"] = measured_now
        if not args.skip_streams:
            result["streams"] = [run_streams(args.streams, args.stream_seconds, Path(tmp)),
                                 run_streams(args.streams, args.stream_seconds, Path(tmp), process_limit=512)]
            result["sections_measured_at"]["streams"] = measured_now
        if not args.skip_upload:
            result["upload"] = run_upload(Path(tmp), args.upload_mb)
            result["sections_measured_at"]["upload"] = measured_now
        if not args.skip_hostile:
            result["hostile"] = run_hostile(Path(tmp))
            result["sections_measured_at"]["hostile"] = measured_now
    ordered = {k: result[k] for k in ("commit", "machine", "date", "sections_measured_at", "load", "streams", "upload",
                                      "hostile", "faults", "fuzz", "tests") if k in result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(ordered, indent=2) + "\n")
    write_markdown(ordered, args.out / "reliability.md")
    print(json.dumps(ordered, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
