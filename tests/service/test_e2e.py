"""End to end through real processes: uvicorn, Celery workers, Redis, a tiny real model.

Upload -> create -> live SSE events -> succeeded -> download the adapter -> load it with peft;
cancel mid-run; kill -9 a worker mid-run and see another resume from the checkpoint; a task
delivered twice runs once.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time

import httpx
import pytest
from celery import Celery

from citi_service.records import JobRecord
from tests.service.test_client import citi

pytestmark = pytest.mark.service


def read_sse(client: httpx.Client, path: str, headers: dict | None = None, timeout: float = 180) -> list[dict]:
    """Every event of an SSE stream, until the server ends it."""
    events, current = [], {}
    deadline = time.time() + timeout
    with client.stream("GET", path, headers={"Accept": "text/event-stream", **(headers or {})},
                       timeout=httpx.Timeout(30, read=30)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            assert time.time() < deadline, "the stream did not end"
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and current:
                events.append(current)
                current = {}
    return events


def statuses(events: list[dict]) -> list[str]:
    return [e["data"]["data"]["status"] for e in events if e["event"] == "status"]


def send_duplicate(service, job_id: str) -> None:
    app = Celery(broker=service.env["REDIS_URL"])
    app.send_task("citi.run_job", args=[job_id], queue="citi-jobs")
    app.close()


def test_job_runs_streams_events_and_yields_a_loadable_adapter(service, workers, uploaded, tmp_path, capsys):
    workers.start("w1")
    workers.start("w2")
    with service.client("alice") as c:
        body = service.job_body(uploaded, suffix="weather", metadata={"team": "tools"})
        r = c.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
        assert r.status_code == 200, r.text
        job = r.json()
        # A worker may have claimed it before the answer was written.
        assert job["object"] == "fine_tuning.job" and job["status"] in ("queued", "validating_files")
        send_duplicate(service, job["id"])  # the same task delivered twice must run once

        events = read_sse(c, f"/jobs/{job['id']}/events")
        seqs = [e["id"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), "event ids are consecutive from 1"
        assert [e["data"]["seq"] for e in events] == seqs
        flow = statuses(events)
        assert flow[0] == "queued" and flow[-1] == "succeeded", (flow, events[-1], service.tail_logs())
        assert flow.count("validating_files") == 1, f"the job started once: {flow}"
        assert flow.index("validating_files") < flow.index("running") < flow.index("succeeded")
        progress = [e["data"]["data"] for e in events
                    if e["event"] == "progress" and e["data"]["data"]["stage"] in ("router_pretraining", "molora", "uco")]
        assert [p["step"] for p in progress] == [1, 2, 3] and all(p["total_steps"] == 3 for p in progress)
        assert all(isinstance(p["loss"], float) for p in progress)
        assert any(e["event"] == "importance" for e in events)
        assert any("duplicate delivery" in e["data"]["message"] for e in events), "the second delivery was dropped"

        # Reconnecting with Last-Event-ID resumes right after that event.
        middle = seqs[len(seqs) // 2]
        again = read_sse(c, f"/jobs/{job['id']}/events", headers={"Last-Event-ID": str(middle)})
        assert [e["id"] for e in again] == seqs[seqs.index(middle) + 1:]

        # The same events as paginated JSON.
        page = c.get(f"/jobs/{job['id']}/events", params={"limit": 5}).json()
        assert [e["seq"] for e in page["data"]] == seqs[:5] and page["has_more"] is True
        page2 = c.get(f"/jobs/{job['id']}/events", params={"after": 5, "limit": 1000}).json()
        assert [e["seq"] for e in page2["data"]] == seqs[5:] and page2["has_more"] is False

        done = c.get(f"/jobs/{job['id']}").json()
        assert done["status"] == "succeeded", done
        # Every field the API, the store and the worker wrote is one the typed record declares.
        stored = set(service.redis.hkeys(f"citi:job:{job['id']}"))
        assert stored <= set(JobRecord.__annotations__), stored - set(JobRecord.__annotations__)
        assert done["attempts"] == 1
        assert done["fine_tuned_model"].startswith("ft:tiny-llama:weather:")
        assert done["trained_tokens"] > 0 and done["finished_at"] >= done["created_at"]
        assert done["metadata"] == {"team": "tools"}
        assert done["selected_components"]["molora"] and done["selected_components"]["uco"]
        assert done["adapter_url"] == f"/jobs/{job['id']}/adapter"
        assert done["error"] is None and done["progress"]["step"] == 3
        # A retried create with the same Idempotency-Key returns the same job, even after it ran.
        retry = c.post("/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
        assert retry.status_code == 200 and retry.json()["id"] == job["id"]

        with c.stream("GET", f"/jobs/{job['id']}/adapter") as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/gzip"
            assert "chunked" in r.headers.get("transfer-encoding", "")
            archive = b"".join(r.iter_bytes())
        report = c.get(f"/jobs/{job['id']}/report")
        assert report.status_code == 200 and "tool" in json.dumps(report.json())

    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = tar.getnames()
        assert all(n.startswith(job["id"] + "/") for n in names), names
        assert not any("checkpoints" in n for n in names)
        for needed in ("adapter_config.json", "adapter_model.safetensors", "importance.json", "importance.png",
                       "citi_job.json", "README.md", "report.json"):
            assert f"{job['id']}/{needed}" in names, (needed, names)
        tar.extractall(tmp_path, filter="data")
    adapter_dir = tmp_path / job["id"]
    assert "PeftModel.from_pretrained" in (adapter_dir / "README.md").read_text()

    import torch

    import citi_engine.molora  # noqa: F401  (registers the MOLoRA peft method)
    from citi_engine.adapter import load_adapter

    model, tokenizer = load_adapter(str(adapter_dir), base=service.model_dir, device="cpu")
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    ids = tokenizer("What's the weather in Oslo?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()

    # The client follows the same job: watch replays its events and ends; download extracts the adapter.
    code, out, _ = citi(service, capsys, "watch", job["id"])
    assert code == 0 and "succeeded" in out and done["fine_tuned_model"] in out
    code, out, _ = citi(service, capsys, "download", job["id"], "-o", str(tmp_path / "cli.tar.gz"),
                        "--extract", str(tmp_path / "cli"))
    assert code == 0
    assert (tmp_path / "cli" / job["id"] / "adapter_model.safetensors").read_bytes() == \
        (adapter_dir / "adapter_model.safetensors").read_bytes()

    # Deleting the job removes its artifacts.
    with service.client("alice") as c:
        assert c.delete(f"/jobs/{job['id']}").json()["deleted"] is True
        assert c.get(f"/jobs/{job['id']}").status_code == 404
    assert not (service.artifact_dir / "jobs" / job["id"]).exists()
    assert not (service.artifact_dir / "work" / job["id"]).exists()


def test_cancel_stops_a_running_job_within_a_step(service, workers, uploaded):
    workers.start("w1")
    with service.client("alice") as c:
        hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "eval_examples": 0}
        job = c.post("/jobs", json=service.job_body(uploaded, budget={"max_steps": 500},
                                                    method={"type": "citi", "hyperparameters": hyper})).json()
        deadline = time.time() + 120
        while True:  # wait for training steps
            events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
            if any(e["type"] == "progress" and e["data"]["stage"] == "router_pretraining" for e in events):
                break
            assert time.time() < deadline, service.tail_logs()
            time.sleep(0.2)
        r = c.post(f"/jobs/{job['id']}/cancel")
        # the job as it is after the request: still stopping, or already stopped when the worker's next step (a few
        # milliseconds on this tiny model) came between the request and the read-back
        assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
        asked = time.time()
        done = service.wait_status(job["id"], ("cancelled", "failed", "succeeded"), timeout=60)
        assert done["status"] == "cancelled", done
        assert time.time() - asked < 30
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        steps = [e["data"]["step"] for e in events if e["type"] == "progress" and e["data"]["stage"] != "importance"]
        assert max(steps) < 20, "stopped long before the budget"
        assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "cancelled"
        assert c.get(f"/jobs/{job['id']}/adapter").status_code == 409
        again = c.post(f"/jobs/{job['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
    # A cancelled job leaves no partial files.
    assert not (service.artifact_dir / "work" / job["id"]).exists()
    assert not (service.artifact_dir / "jobs" / job["id"]).exists()


def test_worker_killed_mid_run_job_resumes_from_checkpoint_on_another_worker(service, workers, uploaded):
    w1 = workers.start("w1")
    with service.client("alice") as c:
        hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "eval_examples": 0}
        body = service.job_body(uploaded, budget={"max_steps": 40}, checkpoint_every=2,
                                method={"type": "citi", "hyperparameters": hyper})
        job = c.post("/jobs", json=body).json()
        deadline = time.time() + 120
        while True:  # wait for a periodic checkpoint
            ckpts = c.get(f"/jobs/{job['id']}/checkpoints").json()["data"]
            if any(k["step_number"] >= 2 for k in ckpts):
                break
            assert time.time() < deadline, service.tail_logs()
            time.sleep(0.1)
        child = json.loads(service.redis.hget("citi:workers", "w1@test"))["pid"]
        assert child
        os.kill(w1.pid, signal.SIGKILL)
        killed_at = time.time()
        while _alive(child):
            assert time.time() - killed_at < 10, "the job's process outlived its worker"
            time.sleep(0.1)
        step_at_kill = max(e["data"]["step"] for e in c.get(f"/jobs/{job['id']}/events",
                                                              params={"limit": 1000}).json()["data"]
                           if e["type"] == "progress" and e["data"]["stage"] != "importance")
        assert step_at_kill < 40, "the job was still running when its worker died"

        workers.start("w2")
        done = service.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        requeued = [e for e in events if e["type"] == "status" and e["data"].get("reason") == "lease_lapsed"]
        assert len(requeued) == 1
        after = events[events.index(requeued[0]):]
        resume = [e for e in after if "resuming from checkpoint" in e["message"]]
        assert resume, "the second worker resumed from the checkpoint"
        train_steps = [e["data"]["step"] for e in after
                       if e["type"] == "progress" and e["data"]["stage"] != "importance"]
        assert train_steps[0] > 2, f"resumed past the checkpoint, not from step 1: {train_steps}"
        assert train_steps[-1] == 40
        assert c.get(f"/jobs/{job['id']}/adapter").status_code == 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by its parent's parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False




def test_examples_too_long_for_the_model_fail_the_job_while_validating_files(service, workers, uploaded):
    workers.start("w1")
    with service.client("alice") as c:
        hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "max_length": 24}
        job = c.post("/jobs", json=service.job_body(uploaded, method={"type": "citi", "hyperparameters": hyper})).json()
        done = service.wait_status(job["id"], ("failed", "succeeded", "cancelled"), timeout=120)
        assert done["status"] == "failed", done
        error = done["error"]
        assert error["code"] == "invalid_file" and error["param"] == "training_file"
        assert error["details"] and {d["code"] for d in error["details"]} == {"too_long"}
        assert all(d["line"] >= 1 and "max_length" in d["message"] for d in error["details"])
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert [e["data"]["status"] for e in events if e["type"] == "status"] == \
            ["queued", "validating_files", "failed"]
    assert not (service.artifact_dir / "work" / job["id"]).exists()


def _poisoned_copy(model_dir: str) -> str:
    """A sibling of the tiny model (so under CITI_MODEL_DIRS) whose final norm is NaN: every loss is NaN."""
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    target = Path(model_dir).parent / "poisoned-llama"
    if not target.exists():
        shutil.copytree(model_dir, target)
        weights = target / "model.safetensors"
        tensors = load_file(str(weights))
        tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return str(target)


def test_a_job_whose_loss_is_not_finite_fails_as_training_diverged_and_keeps_no_adapter(service, workers, uploaded):
    workers.start("w1")
    model = _poisoned_copy(service.model_dir)
    hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "eval_examples": 0}
    with service.client("alice") as c:
        body = service.job_body(uploaded, model=model, method={"type": "lora", "hyperparameters": hyper},
                                checkpoint_every=1)
        job = c.post("/jobs", json=body).json()
        done = service.wait_status(job["id"], ("failed", "succeeded", "cancelled"), timeout=180)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "training_diverged", done["error"]
        assert "lower the learning rate" in done["error"]["message"]
        assert done["fine_tuned_model"] is None and done["adapter_url"] is None
        assert c.get(f"/jobs/{job['id']}/adapter").status_code == 409
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert [e["data"]["status"] for e in events if e["type"] == "status"][-1] == "failed"
    # no poisoned weights kept anywhere: not in storage, not in the working directory (no checkpoint either)
    assert not (service.artifact_dir / "jobs" / job["id"]).exists()
    assert not (service.artifact_dir / "work" / job["id"]).exists()


def test_a_job_whose_process_dies_while_cancelling_ends_cancelled(service, workers, uploaded):
    workers.start("w1")
    with service.client("alice") as c:
        hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "eval_examples": 0}
        job = c.post("/jobs", json=service.job_body(uploaded, budget={"max_steps": 500},
                                                    method={"type": "citi", "hyperparameters": hyper})).json()
        deadline = time.time() + 120
        while c.get(f"/jobs/{job['id']}").json()["status"] != "running":
            assert time.time() < deadline, service.tail_logs()
            time.sleep(0.2)
        child = json.loads(service.redis.hget("citi:workers", "w1@test"))["pid"]
        os.kill(child, signal.SIGSTOP)  # wedged: it cannot see the cancel flag
        try:
            assert c.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
        finally:
            os.kill(child, signal.SIGKILL)  # and then dies without recording anything
        done = service.wait_status(job["id"], ("cancelled", "failed", "succeeded"), timeout=60)
        assert done["status"] == "cancelled" and done["error"] is None, done
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert [e["data"]["status"] for e in events if e["type"] == "status"][-2:] == ["cancelling", "cancelled"]
    assert not (service.artifact_dir / "work" / job["id"]).exists()


def test_a_job_that_does_not_stop_within_the_cancel_grace_is_killed_and_ends_cancelled(service, workers, uploaded):
    workers.start("w1", CITI_CANCEL_GRACE_SECONDS="2")
    with service.client("alice") as c:
        hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "eval_examples": 0}
        job = c.post("/jobs", json=service.job_body(uploaded, budget={"max_steps": 500},
                                                    method={"type": "citi", "hyperparameters": hyper})).json()
        deadline = time.time() + 120
        while c.get(f"/jobs/{job['id']}").json()["status"] != "running":
            assert time.time() < deadline, service.tail_logs()
            time.sleep(0.2)
        child = json.loads(service.redis.hget("citi:workers", "w1@test"))["pid"]
        os.kill(child, signal.SIGSTOP)  # wedged: it never sees the cancel flag, and never exits by itself
        try:
            assert c.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
            asked = time.time()
            done = service.wait_status(job["id"], ("cancelled", "failed", "succeeded"), timeout=30)
        finally:
            if _alive(child):
                os.kill(child, signal.SIGKILL)
        assert done["status"] == "cancelled" and done["error"] is None, done
        assert time.time() - asked < 15, "killed within the grace period (2 s) and the worker's next look"
        assert not _alive(child)
        assert "still running 2 s after its cancel" in service.workers[0].log.read_text()
    assert not (service.artifact_dir / "work" / job["id"]).exists()
