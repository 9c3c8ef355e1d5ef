"""A wedged job cannot hold its worker: a real Celery worker kills a job's process that records no event for
``CITI_JOB_STALL_SECONDS`` (here: stopped with SIGSTOP mid-training, so it never exits by itself and its
worker's heartbeat keeps the lease alive), or that runs ``CITI_JOB_OVERRUN_SECONDS`` past its job's
``budget.max_seconds``. The job ends ``failed`` with ``job_stalled`` / ``job_timeout``, and the same worker
then runs the next job to success.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.reliability.conftest import record_fault

pytestmark = pytest.mark.service


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until its worker reaps it: that is dead too.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _running_child(service, c, job_id: str, worker: str) -> int:
    """Wait until the job trains (past its first progress event), then return its process id."""
    deadline = time.time() + 150
    while True:
        job = c.get(f"/jobs/{job_id}").json()
        assert job["status"] not in ("failed", "succeeded", "cancelled"), job
        if job["status"] == "running" and (job.get("progress") or {}).get("step"):
            return json.loads(service.redis.hget("citi:workers", worker))["pid"]
        assert time.time() < deadline, service.tail_logs()
        time.sleep(0.2)


def _long_job(service, uploaded: str, **overrides) -> dict:
    """A job without evaluation that trains for long unless its budget says otherwise."""
    hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "eval_examples": 0}
    return service.job_body(uploaded, **{"budget": {"max_steps": 500},
                                         "method": {"type": "citi", "hyperparameters": hyper}, **overrides})


def _stop_and_wait_failed(service, c, job_id: str, child: int) -> dict:
    os.kill(child, signal.SIGSTOP)  # wedged: no event, no exit, and the worker still renews its lease
    try:
        done = service.wait_status(job_id, ("failed", "succeeded", "cancelled"), timeout=90)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
    assert not _alive(child), "the worker killed the wedged process"
    return done


def test_a_stalled_job_is_killed_fails_with_job_stalled_and_the_worker_runs_the_next_job(service, workers, uploaded):
    workers.start("s1", CITI_JOB_STALL_SECONDS="20")
    with service.client("alice") as c:
        job = c.post("/jobs", json=_long_job(service, uploaded)).json()
        child = _running_child(service, c, job["id"], "s1@test")
        done = _stop_and_wait_failed(service, c, job["id"], child)
        assert done["status"] == "failed" and done["error"]["code"] == "job_stalled", done
        assert "CITI_JOB_STALL_SECONDS=20" in done["error"]["message"]
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert [e["data"]["status"] for e in events if e["type"] == "status"][-1] == "failed"
        assert not (service.artifact_dir / "work" / job["id"]).exists()  # its partial files are gone

        # The worker is free: the next job runs on it and succeeds (without evaluation, which records no event
        # for longer than this test's short stall limit on a busy 2-core machine).
        nxt = c.post("/jobs", json=_long_job(service, uploaded, budget={"max_steps": 3})).json()
        assert service.wait_status(nxt["id"], ("failed", "succeeded", "cancelled"), timeout=180)["status"] == \
            "succeeded"
        deadline = time.time() + 30  # and then holds no job (its outcome is recorded before the task returns)
        while json.loads(service.redis.hget("citi:workers", "s1@test"))["job"] is not None:
            assert time.time() < deadline, service.tail_logs()
            time.sleep(0.2)
    record_fault("wedged_job", jobs=2, lost=0, stalled_killed=int(done["error"]["code"] == "job_stalled"),
                 next_job_succeeded=1)


def test_a_job_past_its_time_budget_is_killed_and_fails_with_job_timeout(service, workers, uploaded):
    workers.start("o1", CITI_JOB_OVERRUN_SECONDS="0", CITI_JOB_STALL_SECONDS="600")
    with service.client("alice") as c:
        job = c.post("/jobs", json=_long_job(service, uploaded, budget={"max_seconds": 30})).json()
        child = _running_child(service, c, job["id"], "o1@test")
        done = _stop_and_wait_failed(service, c, job["id"], child)
        assert done["status"] == "failed" and done["error"]["code"] == "job_timeout", done
        assert "budget.max_seconds=30" in done["error"]["message"]
