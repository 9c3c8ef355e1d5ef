"""Leases, claims, the reaper and retention, against the real Redis (keys under a prefix of their own).

These pin down the rules the worker relies on: a job is claimed by one worker at a time, a cancelled
job never starts, a lapsed lease is re-queued exactly once however many reapers see it, a job whose
workers keep dying is given up, and artifacts past retention are deleted.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from citi_service.settings import Settings
from citi_service.storage import LocalStorage
from citi_service.store import Store
from tests.service.conftest import REDIS_HOST, REDIS_PORT
from worker.artifacts import sweep_expired
from worker.lease import Reaper

pytestmark = pytest.mark.service


@pytest.fixture
def store(redis_db):
    prefix = f"citi-unit-{uuid.uuid4().hex[:8]}:"
    s = Store(f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}", prefix=prefix)
    yield s
    for key in s.r.scan_iter(prefix + "*"):
        s.r.delete(key)
    s.close()


def new_job(store: Store, tenant: str = "t1") -> str:
    job_id = "ftjob-" + uuid.uuid4().hex[:24]
    store.create_job({"id": job_id, "tenant": tenant, "created_at": int(time.time()), "model": "m",
                      "training_file": "file-x", "attempts": 0, "started_at": None}, max_active=100)
    return job_id


def in_parallel(fns):
    barrier = threading.Barrier(len(fns))
    results = [None] * len(fns)

    def run(i, fn):
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_job_is_claimed_by_one_worker_at_a_time(store):
    job_id = new_job(store)
    outcomes = in_parallel([lambda i=i: store.claim(job_id, f"tok{i}", f"w{i}", 5)[0] for i in range(4)])
    assert sorted(outcomes) == ["claimed", "leased", "leased", "leased"]
    job = store.get_job(job_id)
    assert job["status"] == "validating_files" and job["attempts"] == 1
    winner = outcomes.index("claimed")
    assert store.runner_check(job_id, f"tok{winner}") == (False, True)
    assert store.runner_check(job_id, "tok-other") == (False, False)


def test_a_cancelled_queued_job_is_never_started(store):
    job_id = new_job(store)
    assert store.request_cancel(job_id) == ("cancelled", "queued")
    assert store.claim(job_id, "tok", "w", 5)[0] == "terminal"
    assert store.get_job(job_id)["status"] == "cancelled"
    assert store.queue_position(job_id) is None


def test_a_lapsed_lease_is_requeued_once_however_many_reapers_see_it(store, tmp_path):
    settings = Settings(lease_seconds=0.3, max_attempts=2, artifact_dir=str(tmp_path))
    sent: list[str] = []
    reapers = [Reaper(worker_name=f"r{i}", settings=settings, store=store, storage=LocalStorage(tmp_path),
                      enqueue=sent.append) for i in range(3)]
    job_id = new_job(store)
    assert store.claim(job_id, "tok1", "w1", 0.3)[0] == "claimed"
    assert all(r.tick() == [] for r in reapers), "a live lease is left alone"
    time.sleep(0.5)
    assert store.lapsed_jobs() == [job_id]
    handled = in_parallel([r.tick for r in reapers])
    assert sorted(o for h in handled for _, o in h if o != "gone") == ["requeued"]
    assert sent == [job_id]
    job = store.get_job(job_id)
    assert job["status"] == "queued" and store.queue_position(job_id) == 1
    assert store.runner_check(job_id, "tok1") == (False, False), "the lost worker's token no longer holds the job"

    # Second attempt lost as well: max_attempts=2 gives the job up with the reason recorded.
    assert store.claim(job_id, "tok2", "w2", 0.3) == ("claimed", "2")
    time.sleep(0.5)
    assert reapers[0].tick() == [(job_id, "failed")]
    job = store.get_job(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    events, _ = store.list_events(job_id)
    assert [e["data"].get("status") for e in events if e["type"] == "status"] == \
        ["queued", "validating_files", "queued", "validating_files", "failed"]
    assert sent == [job_id]


def test_a_cancel_pending_when_the_worker_is_lost_ends_cancelled(store, tmp_path):
    settings = Settings(lease_seconds=0.3, artifact_dir=str(tmp_path))
    job_id = new_job(store)
    store.claim(job_id, "tok", "w", 0.3)
    assert store.request_cancel(job_id)[0] == "cancelling"
    assert store.cancel_requested(job_id)
    time.sleep(0.5)
    reaper = Reaper(worker_name="r", settings=settings, store=store, storage=LocalStorage(tmp_path),
                    enqueue=lambda _: pytest.fail("a cancelled job must not be queued again"))
    assert reaper.tick() == [(job_id, "cancelled")]
    assert store.get_job(job_id)["status"] == "cancelled" and not store.cancel_requested(job_id)


def test_artifacts_past_retention_are_deleted_and_the_record_kept(store, tmp_path):
    settings = Settings(retention_seconds=3600, artifact_dir=str(tmp_path))
    storage = LocalStorage(tmp_path)
    job_id = new_job(store, tenant="t9")
    store.claim(job_id, "tok", "w", 5)
    storage.put_bytes(f"jobs/{job_id}/adapter/adapter_model.safetensors", b"w" * 1000)
    store.add_usage("t9", 1000)
    store.transition(job_id, "succeeded", token="tok", fine_tuned_model="ft:m:citi:abc", adapter_bytes=1000)
    assert store.get_job_by_model("t9", "ft:m:citi:abc")["id"] == job_id
    assert sweep_expired(store, storage, settings) == [], "within retention nothing goes"
    later = time.time() + 3601
    assert sweep_expired(store, storage, settings, now=later) == [job_id]
    assert storage.list(f"jobs/{job_id}/") == []
    job = store.get_job(job_id)
    assert job["status"] == "succeeded" and job["artifacts_deleted"] is True
    assert store.usage("t9")["bytes"] == 0
    assert store.get_job_by_model("t9", "ft:m:citi:abc") is None
    assert sweep_expired(store, storage, settings, now=later) == []
