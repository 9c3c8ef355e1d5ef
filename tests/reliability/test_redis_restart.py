"""Redis is killed (``kill -9``) and started again on the same data directory while one job runs and
another waits in the queue: no job, file record or event is lost, and both jobs succeed.

Redis runs with ``appendfsync always`` (see conftest), so the queued job's broker message, the job
records and every event written before the crash are on disk.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import (
    all_events,
    auth,
    base_env,
    record_fault,
    start_api_on,
    stop_process,
    wait_terminal,
)
from tests.service.conftest import TINY_HYPERPARAMETERS, start_worker, to_jsonl, training_lines

pytestmark = pytest.mark.service


def _snapshot(r, prefix: str = "citi:") -> dict:
    """Every job record, file record and event stream in the store, raw."""
    snap = {}
    for key in r.scan_iter(prefix + "*"):
        kind = r.type(key)
        if kind == "hash" and key.count(":") == 2 and key.startswith(prefix + "job:"):
            snap[key] = r.hgetall(key)
        elif kind == "string" and key.startswith(prefix + "file:"):
            snap[key] = r.get(key)
        elif kind == "stream":
            snap[key] = r.xrange(key)
    return snap


def test_redis_killed_and_restarted_loses_no_job_file_or_event(private_redis, tiny_model, tmp_path):
    env = {**base_env(0, tmp_path / "artifacts", Path(tiny_model).parent), "REDIS_URL": private_redis.url,
           "CITI_LEASE_SECONDS": "6"}
    api_log = tmp_path / "api.log"
    api, url = start_api_on(env, api_log)
    worker = start_worker(env, "wr", tmp_path / "wr.log")
    logs = (api_log, worker.log, private_redis.log)
    try:
        r = httpx.post(f"{url}/v1/files", headers=auth(), files={"file": ("t.jsonl", to_jsonl(training_lines()))},
                       data={"purpose": "fine-tune"}, timeout=30)
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        hyper = {**TINY_HYPERPARAMETERS, "eval_examples": 0}
        body = {"model": tiny_model, "training_file": file_id, "method": {"type": "citi", "hyperparameters": hyper},
                "seed": 1, "checkpoint_every": 2}
        long_job = httpx.post(f"{url}/jobs", headers=auth(), json={**body, "budget": {"max_steps": 14}}).json()
        queued_job = httpx.post(f"{url}/jobs", headers=auth(), json={**body, "budget": {"max_steps": 3}}).json()
        jobs = [long_job["id"], queued_job["id"]]

        deadline = time.time() + 120
        while True:  # the first job trains (past a checkpoint); the second waits behind it (one worker)
            events = all_events(url, jobs[0])
            steps = [e["data"]["step"] for e in events if e["type"] == "progress" and e["data"]["stage"] != "importance"]
            if steps and max(steps) >= 3:
                break
            assert time.time() < deadline, "\n".join(p.read_text()[-2000:] for p in logs if p.is_file())
            time.sleep(0.1)
        assert httpx.get(f"{url}/jobs/{jobs[1]}", headers=auth()).json()["status"] == "queued"

        before = _snapshot(private_redis.client())
        private_redis.kill()
        time.sleep(1.5)  # the API, the worker and the job's process all see Redis gone
        down = httpx.get(f"{url}/jobs/{jobs[0]}", headers=auth(), timeout=10)
        # An answer in the error shape saying to retry, not a hung or dropped connection or a 500.
        assert down.status_code == 503 and down.json()["error"]["code"] == "service_unavailable", down.text
        assert down.headers.get("retry-after")
        private_redis.start()

        done = [wait_terminal(url, job_id, timeout=240, logs=logs) for job_id in jobs]
        assert [j["status"] for j in done] == ["succeeded", "succeeded"], [j.get("error") for j in done]

        after = _snapshot(private_redis.client())
        lost_records = [k for k in before if k not in after and not k.endswith(":events")]
        events_lost = 0
        for key, entries in before.items():
            if key.endswith(":events"):
                now = dict(after.get(key, []))
                events_lost += sum(1 for entry_id, fields in entries if now.get(entry_id) != fields)
        assert lost_records == [] and events_lost == 0
        for job_id in jobs:  # every event, before and after the restart, is there once, in order
            seqs = [e["seq"] for e in all_events(url, job_id)]
            assert seqs == list(range(1, len(seqs) + 1)), seqs
        files = httpx.get(f"{url}/v1/files", headers=auth()).json()["data"]
        assert [f["id"] for f in files if f["purpose"] == "fine-tune"] == [file_id]  # the upload, once
        results = {f["id"] for f in files if f["purpose"] == "fine-tune-results"}
        for job_id in jobs:  # and each finished job's adapter archive and report, as its result files say
            assert set(httpx.get(f"{url}/jobs/{job_id}", headers=auth()).json()["result_files"]) <= results
        for job_id in jobs:
            assert httpx.get(f"{url}/jobs/{job_id}/adapter", headers=auth(), timeout=30).status_code == 200
        record_fault("redis_restart", jobs=len(jobs), lost=len(lost_records), events_lost=events_lost,
                     attempts=sum(j["attempts"] for j in done))
    finally:
        worker.stop()
        stop_process(api)
