"""The service on S3-compatible storage (moto's standalone server), as on several hosts: each worker has
its own scratch directory, so a job resumed after its worker was killed must fetch its checkpoint from
the bucket."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time

import httpx
import pytest
import redis

from tests.service.conftest import (
    KEYS,
    REDIS_HOST,
    REDIS_PORT,
    S3_CREDENTIALS,
    TINY_HYPERPARAMETERS,
    base_env,
    claim_redis_db,
    release_redis_db,
    s3_storage,
    start_api,
    start_worker,
    stop_process,
    to_jsonl,
    training_lines,
)
from tests.service.test_e2e import _alive

pytestmark = pytest.mark.service


def test_s3_job_survives_a_killed_worker_and_serves_its_adapter(moto_s3, tiny_model, tmp_path):
    db = claim_redis_db()  # a database of its own: a separate deployment
    bucket = "citi-e2e"
    storage = s3_storage(moto_s3, bucket, prefix="svc")
    env = {**base_env(db, tmp_path / "unused-artifacts", os.path.dirname(tiny_model)), **S3_CREDENTIALS,
           "CITI_STORAGE": "s3", "CITI_S3_BUCKET": bucket, "CITI_S3_PREFIX": "svc",
           "CITI_S3_ENDPOINT_URL": moto_s3, "CITI_QUEUE": "citi-s3"}
    api, url = start_api(env, tmp_path / "api.log")
    w1 = w2 = None
    try:
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=30)
        f = c.post("/v1/files", files={"file": ("t.jsonl", to_jsonl(training_lines()))}).json()
        assert storage.exists(f"files/{f['id']}.jsonl"), "the upload went to the bucket"
        w1 = start_worker({**env, "CITI_WORK_DIR": str(tmp_path / "host1")}, "s3w1", tmp_path / "w1.log")
        hyper = {**TINY_HYPERPARAMETERS, "eval_examples": 0}
        job = c.post("/jobs", json={"model": tiny_model, "training_file": f["id"], "seed": 3,
                                    "method": {"type": "citi", "hyperparameters": hyper},
                                    "budget": {"max_steps": 200}, "checkpoint_every": 2}).json()
        # Any complete checkpoint in the bucket will do: a stage boundary stays until the job ends, while a
        # periodic one may be pruned by the next before its upload finishes (the tiny model's steps are faster
        # than an upload), so waiting for a periodic one raced the end of the job.
        prefix = f"jobs/{job['id']}/checkpoints/"
        deadline = time.time() + 120
        while not any(o.key.startswith(prefix) and o.key.endswith("/meta.json") for o in storage.list(prefix)):
            assert time.time() < deadline, (tmp_path / "w1.log").read_text()[-3000:]
            time.sleep(0.1)
        child = _worker_pid(db, "s3w1@test")
        os.kill(w1.pid, signal.SIGKILL)
        t0 = time.time()
        while _alive(child):
            assert time.time() - t0 < 10
            time.sleep(0.1)

        # The first checkpoint can reach the bucket before any training step's progress event is written (a stage
        # boundary comes before the stage's first step), so no progress event at all is a valid state here.
        assert c.get(f"/jobs/{job['id']}").json()["status"] not in ("succeeded", "failed", "cancelled"), \
            "the job was still running when its worker died"
        steps = [e["data"]["step"] for e in c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
                 if e["type"] == "progress" and e["data"]["stage"] != "importance"]
        assert max(steps, default=0) < 200, "the job was still running when its worker died"

        w2 = start_worker({**env, "CITI_WORK_DIR": str(tmp_path / "host2")}, "s3w2", tmp_path / "w2.log")
        deadline = time.time() + 180
        while (done := c.get(f"/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, (tmp_path / "w2.log").read_text()[-3000:]
            time.sleep(0.3)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert any("resuming from checkpoint" in e["message"] for e in events), \
            "host 2 resumed from the checkpoint it fetched from the bucket"

        archive = c.get(f"/jobs/{job['id']}/adapter").content
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            names = tar.getnames()
        assert f"{job['id']}/adapter_model.safetensors" in names and not any("checkpoints" in n for n in names)
        assert storage.list(prefix) == [], "checkpoints leave the bucket once the job has succeeded"
        assert not (tmp_path / "host2" / job["id"]).exists()
        assert c.delete(f"/jobs/{job['id']}").status_code == 200
        assert storage.list(f"jobs/{job['id']}/") == []
        c.close()
    finally:
        for w in (w1, w2):
            if w is not None:
                w.stop()
        stop_process(api)
        release_redis_db(db)


def _worker_pid(db: int, name: str) -> int:
    info = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, decode_responses=True).hget("citi:workers", name)
    return int(json.loads(info)["pid"])
