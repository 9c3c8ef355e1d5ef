"""The same task delivered several times runs its job once; the adapter archive holds only the job's
adapter; a full disk fails the job with a clear error and serves nothing.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time

import pytest
from celery import Celery

from tests.reliability.conftest import record_fault

pytestmark = pytest.mark.service


def _send(service, job_id: str, times: int) -> None:
    app = Celery(broker=service.env["REDIS_URL"])
    try:
        for _ in range(times):
            app.send_task("citi.run_job", args=[job_id], queue="citi-jobs")
    finally:
        app.close()


def test_a_task_delivered_three_times_runs_once_and_its_archive_holds_only_its_adapter(service, workers, uploaded,
                                                                                      tmp_path):
    workers.start("d1")
    workers.start("d2")
    with service.client("alice") as c:
        job = c.post("/jobs", json=service.job_body(uploaded)).json()
        _send(service, job["id"], 3)  # four deliveries in all, to two workers
        done = service.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
        assert done["status"] == "succeeded", done
        _send(service, job["id"], 1)  # a late duplicate of a finished job
        time.sleep(3)
        final = c.get(f"/jobs/{job['id']}").json()
        events = c.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        starts = [e for e in events if e["type"] == "status" and e["data"]["status"] == "validating_files"]
        assert final["status"] == "succeeded" and final["attempts"] == 1 and len(starts) == 1, \
            [e["message"] for e in events if e["type"] == "status"]
        record_fault("duplicate_delivery", jobs=1, lost=0, ran_twice=len(starts) - 1, deliveries=5)

        # Plant a link to a file outside and a sibling outside the adapter directory: neither is served.
        adapter_dir = service.artifact_dir / "jobs" / job["id"] / "adapter"
        assert adapter_dir.is_dir()
        secret = tmp_path / "secret.txt"
        secret.write_text("not yours")
        (adapter_dir / "escape.txt").symlink_to(secret)
        (adapter_dir.parent / "sibling.txt").write_text("outside the adapter")
        r = c.get(f"/jobs/{job['id']}/adapter")
        assert r.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names and all(n == job["id"] or n.startswith(job["id"] + "/") for n in names), names
            assert not any(".." in n.split("/") or n.startswith("/") for n in names)
            assert all(m.isfile() or m.isdir() for m in members), "no links or devices"
            assert not any(n.endswith(("escape.txt", "sibling.txt")) or "checkpoints" in n for n in names), names
            assert any(n.endswith("adapter_model.safetensors") for n in names), names
            assert not any(n.endswith((".bin", ".pt", ".pkl", ".pickle")) for n in names), names
            assert b"not yours" not in b"".join(tar.extractfile(m).read() for m in members if m.isfile())


@pytest.fixture
def full_disk(service):
    """A 256 KiB tmpfs over the adapters' directory, filled up (needs root, as in this dev container)."""
    jobs_dir = service.artifact_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(jobs_dir)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mount.stderr.decode().strip()}")
    try:
        fd = os.open(jobs_dir / ".filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        yield jobs_dir
    finally:
        subprocess.run(["umount", "-l", str(jobs_dir)], check=False)


def test_a_full_disk_fails_the_job_clearly_and_serves_nothing(service, workers, uploaded, full_disk):
    workers.start("df")
    with service.client("alice") as c:
        job = c.post("/jobs", json=service.job_body(uploaded)).json()
        done = service.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
        assert done["status"] == "failed", done
        error = done["error"]
        assert error["code"] == "storage_error", error
        assert "No space left" in error["message"] and "adapter" in error["message"], error
        assert c.get(f"/jobs/{job['id']}/adapter").status_code == 409
        assert c.get(f"/jobs/{job['id']}/report").status_code == 409
        assert done.get("fine_tuned_model") is None
    job_dir = full_disk / job["id"]
    assert not job_dir.exists() or not any(p.is_file() for p in job_dir.rglob("*")), "no partial adapter kept"
    assert not (service.artifact_dir / "work" / job["id"]).exists()
    assert os.path.exists(full_disk / ".filler")
