"""A job that may use several GPUs: the worker trains it on one process per GPU (torchrun), and the
service sees one job, as with a single process. On CPU the processes talk over gloo."""

from __future__ import annotations

import io
import os
import tarfile
import time

import pytest

from tests.service.test_e2e import _alive, read_sse, statuses
from worker.runner import gpus_per_job, torchrun_args


def test_a_job_uses_every_gpu_its_worker_sees_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("CITI_GPUS_PER_JOB", raising=False)
    assert gpus_per_job("cpu") == 1 and gpus_per_job("cuda:1") == 1
    assert gpus_per_job(None) == 1  # this machine has no GPU
    monkeypatch.setenv("CITI_GPUS_PER_JOB", "3")
    assert gpus_per_job("cpu") == 3  # CPU processes over gloo, when asked for
    monkeypatch.setenv("CITI_GPUS_PER_JOB", "1")
    assert gpus_per_job(None) == 1
    for bad in ("0", "two"):
        monkeypatch.setenv("CITI_GPUS_PER_JOB", bad)
        with pytest.raises(ValueError, match="CITI_GPUS_PER_JOB"):
            gpus_per_job(None)


def test_the_training_processes_are_started_by_torchruns_standalone_launcher():
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(torchrun_args(4))
    assert args.standalone and args.module and args.training_script == "worker.runner"
    config, cmd, cmd_args = config_from_args(args)
    assert config.min_nodes == config.max_nodes == 1 and config.nproc_per_node == 4
    assert config.max_restarts == 0
    assert cmd_args[-2:] == ["-m", "worker.runner"]


@pytest.mark.service
def test_a_job_trained_by_two_processes_reports_ends_and_cancels_like_one(service, workers, uploaded, tmp_path):
    workers.start("w1", CITI_GPUS_PER_JOB="2")
    with service.client("alice") as c:
        hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "packing": True}
        body = service.job_body(uploaded, budget={"max_steps": 4}, checkpoint_every=2,
                                method={"type": "citi", "hyperparameters": hyper})
        job = c.post("/jobs", json=body).json()
        events = read_sse(c, f"/jobs/{job['id']}/events")
        flow = statuses(events)
        assert flow == ["queued", "validating_files", "running", "succeeded"], (flow, service.tail_logs())
        assert any(e["data"]["message"] == "training on 2 data-parallel processes" for e in events)
        assert any("packed rows" in e["data"]["message"] for e in events)
        # One process speaks for the job: every step once, counted over both processes.
        progress = [e["data"]["data"] for e in events
                    if e["event"] == "progress" and e["data"]["data"]["stage"] in ("router_pretraining", "molora", "uco")]
        assert [p["step"] for p in progress] == [1, 2, 3, 4] and all(p["total_steps"] == 4 for p in progress)
        assert sum(1 for e in events if e["event"] == "importance") == 1
        # Rank 0 alone writes checkpoints: no step is recorded twice. (Which periodic ones get recorded depends on
        # timing: a newer checkpoint prunes the older periodic one, possibly before the watcher's next scan.)
        recorded = [(k["kind"], k["step_number"]) for k in c.get(f"/jobs/{job['id']}/checkpoints").json()["data"]]
        assert recorded and len(recorded) == len(set(recorded)) and all(0 <= s <= 4 for _, s in recorded)
        done = c.get(f"/jobs/{job['id']}").json()
        assert done["trained_tokens"] > 0 and done["attempts"] == 1 and done["error"] is None
        archive = c.get(f"/jobs/{job['id']}/adapter")
        assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    from citi_engine.adapter import load_adapter

    model, _ = load_adapter(str(tmp_path / job["id"]), base=service.model_dir, device="cpu")
    assert any("molora_router" in n for n, _ in model.named_parameters())
    assert not (service.artifact_dir / "work" / job["id"]).exists()

    # A cancel reaches every process: the job ends cancelled within a few steps, no process is left.
    with service.client("alice") as c:
        body = service.job_body(uploaded, budget={"max_steps": 500},
                                method={"type": "citi", "hyperparameters": {**hyper, "eval_examples": 0}})
        job = c.post("/jobs", json=body).json()
        deadline = time.time() + 120
        while not any(e["type"] == "progress" and e["data"]["stage"] == "router_pretraining"
                      for e in c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]):
            assert time.time() < deadline, service.tail_logs()
            time.sleep(0.2)
        ranks = _training_processes(job["id"])
        assert len(ranks) == 2, ranks
        assert c.post(f"/jobs/{job['id']}/cancel").status_code == 200
        done = service.wait_status(job["id"], ("cancelled", "failed", "succeeded"), timeout=60)
        assert done["status"] == "cancelled", (done, service.tail_logs())
        steps = [e["data"]["step"] for e in c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
                 if e["type"] == "progress" and e["data"]["stage"] != "importance"]
        assert max(steps) < 20
    deadline = time.time() + 30
    while any(_alive(pid) for pid in ranks):
        assert time.time() < deadline, "a training process outlived its cancelled job"
        time.sleep(0.2)
    assert not (service.artifact_dir / "work" / job["id"]).exists()


def _training_processes(job_id: str) -> list[int]:
    """Pids of the processes that train ``job_id`` (their environment names the job)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if f"CITI_JOB_ID={job_id}".encode() in env and b"worker.runner" in cmd:
            found.append(int(entry))
    return found


@pytest.mark.service
def test_a_killed_training_process_sends_the_job_back_to_resume_from_its_checkpoint(service, workers, uploaded):
    """kill -9 of one of two training processes: the other's collective breaks, the launcher sees a killed
    process, and the worker queues the job again; the next attempt resumes from the last checkpoint and ends."""
    workers.start("w1", CITI_GPUS_PER_JOB="2")
    with service.client("alice") as c:
        hyper = {**service.job_body(uploaded)["method"]["hyperparameters"], "eval_examples": 0}
        body = service.job_body(uploaded, budget={"max_steps": 60}, checkpoint_every=2,
                                method={"type": "citi", "hyperparameters": hyper})
        job = c.post("/jobs", json=body).json()
        deadline = time.time() + 180
        while not c.get(f"/jobs/{job['id']}/checkpoints").json()["data"]:
            assert time.time() < deadline, service.tail_logs()
            assert c.get(f"/jobs/{job['id']}").json()["status"] in ("queued", "validating_files", "running")
            time.sleep(0.2)
        rank_one = [pid for pid in _training_processes(job["id"]) if _rank(pid) == 1]
        assert len(rank_one) == 1
        os.kill(rank_one[0], 9)
        done = service.wait_status(job["id"], ("cancelled", "failed", "succeeded"), timeout=240)
        assert done["status"] == "succeeded", (done, service.tail_logs())
        assert done["attempts"] == 2
        messages = [e["message"] for e in c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]]
        assert any("training processes was killed; queued again to resume" in m for m in messages), messages
        assert any(m.startswith("resuming from checkpoint") for m in messages), messages


def _rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None
