"""Two jobs on two workers; one worker is killed with ``kill -9`` mid-stage. Its job is re-queued once
its lease lapses, resumes from its last checkpoint on the surviving worker, and both jobs succeed with
complete adapters whose weights load (safetensors).
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time

import pytest

from tests.reliability.conftest import record_fault
from tests.service.conftest import TINY_HYPERPARAMETERS

pytestmark = pytest.mark.service


def _train_steps(events: list[dict]) -> list[int]:
    return [e["data"]["step"] for e in events if e["type"] == "progress" and e["data"]["stage"] != "importance"]


def test_a_killed_workers_job_resumes_from_its_checkpoint_and_both_jobs_succeed(service, workers, uploaded):
    w1, w2 = workers.start("k1"), workers.start("k2")
    hyper = {**TINY_HYPERPARAMETERS, "eval_examples": 0}
    body = service.job_body(uploaded, budget={"max_steps": 40}, checkpoint_every=2,
                            method={"type": "citi", "hyperparameters": hyper})
    with service.client("alice") as c:
        jobs = [c.post("/jobs", json=body).json()["id"] for _ in range(2)]
        deadline = time.time() + 150
        while True:  # both running, each past a checkpoint
            running = {json.loads(v).get("job"): name for name, v in service.redis.hgetall("citi:workers").items()}
            ckpts = {j: c.get(f"/jobs/{j}/checkpoints").json()["data"] for j in jobs}
            if all(j in running for j in jobs) and all(any(k["step_number"] >= 2 for k in ckpts[j]) for j in jobs):
                break
            assert time.time() < deadline, service.tail_logs()
            time.sleep(0.1)
        # The victim is the job that is least far along: the other may already be near its last step (a
        # tiny model trains fast), and a job killed after its last checkpoint has nothing left to resume.
        steps = {j: max(_train_steps(c.get(f"/jobs/{j}/events", params={"limit": 1000}).json()["data"]), default=0)
                 for j in jobs}
        victim_job = min(jobs, key=steps.get)
        victim, survivor = (w1, w2) if running[victim_job] == "k1@test" else (w2, w1)
        os.killpg(victim.pid, signal.SIGKILL)  # the worker and its job's process
        step_at_kill = max(_train_steps(c.get(f"/jobs/{victim_job}/events", params={"limit": 1000}).json()["data"]))
        assert step_at_kill < 40, f"the victim finished training before the kill ({steps}); nothing left to resume"

        done = {j: service.wait_status(j, ("succeeded", "failed", "cancelled"), timeout=240) for j in jobs}
        assert [d["status"] for d in done.values()] == ["succeeded", "succeeded"], done
        assert done[victim_job]["attempts"] == 2 and all(d["attempts"] == 1 for j, d in done.items() if j != victim_job)
        events = c.get(f"/jobs/{victim_job}/events", params={"limit": 1000}).json()["data"]
        requeue = next(i for i, e in enumerate(events) if e["type"] == "status" and e["data"].get("reason") == "lease_lapsed")
        after = events[requeue:]
        assert any("resuming from checkpoint" in e["message"] for e in after)
        resumed_steps = _train_steps(after)
        assert 2 < resumed_steps[0] <= step_at_kill + 1 and resumed_steps[-1] == 40, (resumed_steps, step_at_kill)

        from safetensors.numpy import load as load_safetensors

        for job_id in jobs:
            r = c.get(f"/jobs/{job_id}/adapter")
            assert r.status_code == 200
            with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            assert json.loads(files["adapter_config.json"])
            weights = load_safetensors(files["adapter_model.safetensors"])
            assert weights and all(w.size > 0 for w in weights.values())
    assert survivor.proc.poll() is None
    record_fault("worker_kill", jobs=len(jobs), lost=sum(d["status"] != "succeeded" for d in done.values()),
                 resumed=sum(d["attempts"] > 1 for d in done.values()))
