"""OpenAI's job fields, model deletion, request ids and list filters, driven through the official ``openai``
client against the real API (and, for a fine-tuned model, a real Celery worker training a tiny model)."""

from __future__ import annotations

import httpx
import openai
import pytest

from citi_service.records import JobRecord
from tests.service.conftest import KEYS, TINY_HYPERPARAMETERS, to_jsonl, training_lines


def client_for(service, who: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url + "/v1", api_key=KEYS[who], max_retries=0, timeout=60)


@pytest.fixture
def jobs(service):
    """Create jobs with ``jobs.create(**kwargs)``; every one still unfinished is cancelled after the test."""
    client = client_for(service)
    made: list[str] = []

    class _Jobs:
        def create(self, uploaded: str, **kwargs):
            kwargs.setdefault("extra_body", {"budget": {"max_steps": 3}})
            job = client.fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded, **kwargs)
            made.append(job.id)
            return job

    yield _Jobs()
    for job_id in made:
        try:
            client.fine_tuning.jobs.cancel(job_id)
        except openai.APIStatusError:
            pass  # already finished


# -- hyperparameters and method ------------------------------------------------------------------


def test_openai_hyperparameters_map_onto_the_tool_learning_stage_and_every_default_learning_rate(
        service, uploaded, jobs):
    job = jobs.create(uploaded, hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0})
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size,
            job.hyperparameters.learning_rate_multiplier) == (2, 4, 2.0)
    ours = job.method.hyperparameters
    assert job.method.type == "citi"
    assert ours["epochs_molora"] == 2 and ours["batch_size"] == 4
    assert ours["epochs_router_pretraining"] == 1.0 and ours["epochs_uco"] == 1.0  # the other stages keep theirs
    assert ours["lr_router_pretraining"] == pytest.approx(4e-4)
    assert ours["lr_molora"] == pytest.approx(2e-3)
    assert ours["lr_uco"] == pytest.approx(4e-5)
    again = client_for(service).fine_tuning.jobs.retrieve(job.id)
    assert again.hyperparameters.n_epochs == 2 and again.hyperparameters.learning_rate_multiplier == 2.0


def test_a_job_without_openai_fields_reports_them_resolved_from_our_defaults(service, uploaded, jobs):
    job = jobs.create(uploaded)
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size,
            job.hyperparameters.learning_rate_multiplier) == (3, 16, 1)


def test_method_supervised_is_citi_with_its_hyperparameters_and_auto_means_our_default(service, uploaded, jobs):
    job = jobs.create(uploaded, method={"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": "auto"}}})
    assert job.method.type == "citi"
    assert job.method.supervised.hyperparameters.n_epochs == 1
    assert job.method.hyperparameters["epochs_molora"] == 1 and job.method.hyperparameters["batch_size"] == 16
    assert job.method.hyperparameters["lr_molora"] == pytest.approx(1e-3)
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.learning_rate_multiplier == 1


def test_openai_fields_map_onto_the_single_stage_of_lora_and_full(service, uploaded, jobs):
    lora = jobs.create(uploaded, extra_body={"budget": {"max_steps": 3}, "method": {
        "type": "lora", "hyperparameters": {"n_epochs": 4, "learning_rate_multiplier": 0.5}}})
    assert lora.method.hyperparameters["epochs_train"] == 4
    assert lora.method.hyperparameters["lr_train"] == pytest.approx(5e-4)
    assert (lora.hyperparameters.n_epochs, lora.hyperparameters.learning_rate_multiplier) == (4, 0.5)
    full = jobs.create(uploaded, extra_body={"budget": {"max_steps": 3}, "method": {"type": "full"},
                                             "hyperparameters": {"learning_rate_multiplier": 3}})
    assert full.method.hyperparameters["lr_train"] == pytest.approx(3e-4)


def test_our_own_learning_rate_wins_over_the_multiplier_and_a_disagreeing_epochs_pair_is_refused(
        service, uploaded, jobs):
    job = jobs.create(uploaded, extra_body={"budget": {"max_steps": 3}, "method": {"type": "citi", "hyperparameters": {
        "lr_molora": 5e-4, "learning_rate_multiplier": 2}}})
    assert job.method.hyperparameters["lr_molora"] == pytest.approx(5e-4)
    assert job.method.hyperparameters["lr_uco"] == pytest.approx(4e-5)
    assert job.hyperparameters.learning_rate_multiplier == 0.5  # what the tool-learning stage runs with
    client = client_for(service)
    cases = [
        ({"hyperparameters": {"n_epochs": 2}, "extra_body": {"method": {"type": "citi", "hyperparameters": {
            "epochs_molora": 5}}}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}},
         "method.supervised.hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"learning_rate_multiplier": 5000}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"batch_size": 0}}, "method.hyperparameters.batch_size"),
        ({"extra_body": {"method": {"type": "lora", "supervised": {"hyperparameters": {}}}}}, "method.supervised"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded, **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded,
                                       method={"type": "dpo", "dpo": {}})


def test_integrations_are_accepted_stored_and_listed_back(service, uploaded, jobs):
    wandb = [{"type": "wandb", "wandb": {"project": "tools", "tags": ["a"]}}]
    job = jobs.create(uploaded, integrations=wandb)
    assert [i.type for i in job.integrations] == ["wandb"]
    client = client_for(service)
    assert client.fine_tuning.jobs.retrieve(job.id).integrations[0].wandb.project == "tools"
    listed = {j.id: j for j in client.fine_tuning.jobs.list(limit=20).data}
    assert listed[job.id].integrations[0].to_dict() == wandb[0]
    assert jobs.create(uploaded, integrations=[]).integrations == []
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded,
                                       integrations=[{"wandb": {"project": "no type"}}])


# -- list filters, suffix, request ids -----------------------------------------------------------


def test_jobs_list_filters_by_metadata_pairs(service, uploaded, jobs):
    a = jobs.create(uploaded, metadata={"team": "search", "run": "1"})
    b = jobs.create(uploaded, metadata={"team": "search", "run": "2"})
    c = jobs.create(uploaded, metadata={"team": "ads"})
    client = client_for(service)
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"})] == [b.id, a.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search", "run": "1"})] == [a.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "ads"})] == [c.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "nobody"}).data == []
    r = httpx.get(service.url + "/v1/fine_tuning/jobs", params={"metadata": "team"},
                  headers={"Authorization": f"Bearer {KEYS['alice']}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


def test_files_list_honours_order(service, tmp_path):
    client = client_for(service, "bob")
    ids = []
    for i in range(3):
        path = tmp_path / f"train{i}.jsonl"
        path.write_bytes(to_jsonl(training_lines(seed=i)))
        ids.append(client.files.create(file=path.open("rb"), purpose="fine-tune").id)
    try:
        newest_first = [f.id for f in client.files.list(order="desc") if f.id in ids]
        oldest_first = [f.id for f in client.files.list(order="asc") if f.id in ids]
        assert newest_first == ids[::-1] and oldest_first == ids
        page = client.files.list(order="asc", after=ids[0], limit=1)
        assert [f.id for f in page.data] == [ids[1]]
        assert [f.id for f in client.files.list() if f.id in ids] == ids[::-1]  # the default stays newest first
    finally:
        for file_id in ids:
            client.files.delete(file_id)


def test_suffix_may_be_64_characters(service, uploaded, jobs):
    assert jobs.create(uploaded, suffix="s" * 64).suffix == "s" * 64
    with pytest.raises(openai.BadRequestError) as err:
        client_for(service).fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded, suffix="s" * 65)
    assert err.value.body["param"] == "suffix"


def test_every_response_carries_an_x_request_id_echoing_a_sane_one(service):
    client = client_for(service)
    raw = client.models.with_raw_response.list()
    first = raw.headers["x-request-id"]
    assert first.startswith("req_") and len(first) == 36
    assert client.models.with_raw_response.list().headers["x-request-id"] != first
    mine = client.models.with_raw_response.list(extra_headers={"x-request-id": "trace-42.a:b"})
    assert mine.headers["x-request-id"] == "trace-42.a:b"
    odd = client.models.with_raw_response.list(extra_headers={"x-request-id": "no spaces <script>"})
    assert odd.headers["x-request-id"].startswith("req_")
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=service.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert err.value.response.headers["x-request-id"].startswith("req_")
    assert err.value.request_id == err.value.response.headers["x-request-id"]
    assert httpx.get(service.url + "/healthz").headers["x-request-id"].startswith("req_")
    big = httpx.post(service.url + "/v1/fine_tuning/jobs", content=b"x" * 2_000_000,
                     headers={"Authorization": f"Bearer {KEYS['alice']}", "x-request-id": "big-1"})
    assert big.status_code == 413 and big.headers["x-request-id"] == "big-1"


# -- deleting a fine-tuned model -----------------------------------------------------------------


def test_models_delete_removes_a_fine_tuned_model_and_keeps_its_job(service, workers, uploaded):
    workers.start("w-models")
    alice, bob = client_for(service), client_for(service, "bob")
    job = alice.fine_tuning.jobs.create(
        model=service.model_dir, training_file=uploaded, suffix="gone",
        hyperparameters={"n_epochs": 1},
        extra_body={"budget": {"max_steps": 3}, "method": {"type": "citi", "hyperparameters": TINY_HYPERPARAMETERS}})
    done = service.wait_status(job.id, ("succeeded", "failed", "cancelled"), timeout=300)
    assert done["status"] == "succeeded", done
    model = done["fine_tuned_model"]
    assert model in [m.id for m in alice.models.list()]
    adapter_dir = service.artifact_dir / "jobs" / job.id / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()

    with pytest.raises(openai.NotFoundError):
        bob.models.delete(model)  # another tenant's model looks like none
    with pytest.raises(openai.PermissionDeniedError):
        alice.models.delete(service.model_dir)  # a base model
    deleted = alice.models.delete(model)
    assert (deleted.id, deleted.object, deleted.deleted) == (model, "model", True)

    assert not adapter_dir.exists()
    assert model not in [m.id for m in alice.models.list()]
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve(model)
    with pytest.raises(openai.NotFoundError):
        alice.models.delete(model)
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    kept = alice.fine_tuning.jobs.retrieve(job.id)
    assert kept.status == "succeeded" and kept.fine_tuned_model == model
    with service.client("alice") as c:
        assert c.get(f"/jobs/{job.id}").json()["artifacts_deleted"] is True
        assert c.get(f"/jobs/{job.id}/adapter").status_code == 410
        assert c.delete(f"/jobs/{job.id}").json()["deleted"] is True  # the job itself can still be deleted


def test_an_unexpected_500_carries_the_request_id_too():
    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app()

    @app.get("/boom")
    def boom():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"x-request-id": "t-500"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] == "t-500"


def test_a_job_stored_before_the_openai_fields_were_recorded_still_reports_them(service, uploaded, jobs):
    import json

    job = jobs.create(uploaded, extra_body={"budget": {"max_steps": 3}, "method": {"type": "lora", "hyperparameters": {
        "epochs_train": 5, "lr_train": 2e-3}}})
    key = f"citi:job:{job.id}"
    stored = json.loads(service.redis.hget(key, "hyperparameters"))
    for name in ("n_epochs", "learning_rate_multiplier"):
        del stored[name]
    service.redis.hset(key, "hyperparameters", json.dumps(stored))
    old = client_for(service).fine_tuning.jobs.retrieve(job.id)
    assert (old.hyperparameters.n_epochs, old.hyperparameters.batch_size,
            old.hyperparameters.learning_rate_multiplier) == (5, 16, 2)


# -- result files, events and checkpoints in OpenAI's shape, pause and resume, continuing a model -------------

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def citi_job(service, uploaded, tmp_path_factory) -> dict:
    """A CITI job trained to success by alice (3 steps, with an evaluation report), as ``GET /jobs/{id}`` gives it."""
    from tests.service.conftest import start_worker

    worker = start_worker(service.env, "w-oai", tmp_path_factory.mktemp("w-oai") / "w-oai.log")
    try:
        job = client_for(service).fine_tuning.jobs.create(
            model=service.model_dir, training_file=uploaded, suffix="results",
            extra_body={"budget": {"max_steps": 3}, "method": {"type": "citi", "hyperparameters": TINY_HYPERPARAMETERS}})
        done = service.wait_status(job.id, TERMINAL, timeout=300)
    finally:
        worker.stop()
    assert done["status"] == "succeeded", done
    return done


def test_result_files_are_the_adapter_archive_and_the_report_as_files_of_the_jobs_tenant(service, citi_job):
    import io
    import json
    import tarfile

    alice, bob = client_for(service), client_for(service, "bob")
    job = alice.fine_tuning.jobs.retrieve(citi_job["id"])
    assert len(job.result_files) == 2 and all(f.startswith("file-") for f in job.result_files)
    archive_id, report_id = job.result_files
    archive, report = alice.files.retrieve(archive_id), alice.files.retrieve(report_id)
    assert (archive.purpose, archive.filename) == ("fine-tune-results", f"{job.id}.tar.gz")
    assert (report.purpose, report.filename) == ("fine-tune-results", "report.json")
    assert archive.to_dict()["job_id"] == job.id and archive.status == "processed"
    listed = [f.id for f in alice.files.list(purpose="fine-tune-results")]
    assert archive_id in listed and report_id in listed
    assert archive_id not in [f.id for f in alice.files.list(purpose="fine-tune")]

    data = alice.files.content(archive_id).read()
    assert len(data) == archive.bytes
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"adapter_config.json", "adapter_model.safetensors", "citi_job.json", "report.json"} <= names
    assert names == set(citi_job["adapter_files"])  # the same files GET /jobs/{id}/adapter streams
    with service.client("alice") as c:
        assert json.loads(alice.files.content(report_id).read()) == c.get(f"/jobs/{job.id}/report").json()
    # Registered by reference: no bytes counted twice, the report not copied.
    adapter_report = service.artifact_dir / "jobs" / job.id / "adapter" / "report.json"
    assert report.bytes == adapter_report.stat().st_size
    assert not list((service.artifact_dir / "files").glob(f"{report_id}*"))

    # Another tenant's key finds none of them; a result file is no training file.
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(archive_id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(report_id)
    assert archive_id not in [f.id for f in bob.files.list()]
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.create(model=service.model_dir, training_file=archive_id)
    assert (err.value.code, err.value.body["param"]) == ("invalid_file_purpose", "training_file")


def test_events_are_newest_first_in_openai_shape_and_page_with_after_while_ours_stay_oldest_first(
        service, citi_job):
    alice = client_for(service)
    job_id = citi_job["id"]
    with service.client("alice") as c:
        ours = c.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert [e["seq"] for e in ours] == list(range(1, len(ours) + 1))  # our route: unchanged, oldest first
    assert ours[0]["type"] == "status" and ours[0]["id"] == "1"

    events = list(alice.fine_tuning.jobs.list_events(job_id, limit=7))  # the SDK pages on with `after`
    assert [e.seq for e in events] == [e["seq"] for e in reversed(ours)]
    assert len({e.id for e in events}) == len(events) and all(e.id.startswith("ftevent-") for e in events)
    assert {e.type for e in events} == {"message", "metrics"}
    assert events[0].event_type == "status" and events[0].data["status"] == "succeeded"
    assert events[-1].message == "job created and queued"
    assert all(e.level in ("info", "warn", "error") and e.created_at > 0 for e in events)
    metrics = [e for e in events if e.type == "metrics"]
    assert [m.data["step"] for m in metrics] == [3, 2, 1]
    assert all(m.data["total_steps"] == 3 and isinstance(m.data["train_loss"], float) for m in metrics)
    assert all(m.data["train_loss"] == m.data["loss"] and m.event_type == "progress" for m in metrics)
    by_seq = {e["seq"]: e for e in ours}
    assert all(e.message == by_seq[e.seq]["message"] for e in events)

    first = alice.fine_tuning.jobs.list_events(job_id, limit=5)
    assert first.has_more and [e.seq for e in first.data] == [e.seq for e in events[:5]]
    second = alice.fine_tuning.jobs.list_events(job_id, limit=5, after=first.data[-1].id)
    assert [e.seq for e in second.data] == [e.seq for e in events[5:10]]
    last = alice.fine_tuning.jobs.list_events(job_id, after=events[-2].id)
    assert [e.seq for e in last.data] == [1] and not last.has_more
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.list_events(job_id, after="ftevent-nonsense")
    assert err.value.body["param"] == "after"


def test_pause_stops_a_running_job_at_a_checkpoint_and_resume_continues_from_it(service, workers, uploaded):
    workers.start("w-pause")
    alice = client_for(service)
    hyper = {**TINY_HYPERPARAMETERS, "eval_examples": 0}
    job = alice.fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded, extra_body={
        "budget": {"max_steps": 30}, "checkpoint_every": 2, "method": {"type": "citi", "hyperparameters": hyper}})
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.resume(job.id)  # not paused
    assert (err.value.code, err.value.body["param"]) == ("job_not_paused", "job_id")
    service.wait_status(job.id, ("running", *TERMINAL), timeout=120)
    asked = alice.fine_tuning.jobs.pause(job.id)
    assert asked.status in ("running", "paused")
    paused = service.wait_status(job.id, ("paused", *TERMINAL), timeout=120)
    assert paused["status"] == "paused", paused
    assert paused["pause_requested"] is False and paused["finished_at"] is None
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.pause(job.id)  # not running
    assert (err.value.code, err.value.body["param"]) == ("job_not_running", "job_id")
    assert service.redis.exists(f"citi:job:{job.id}:lease") == 0
    assert not service.redis.sismember("citi:running", job.id)

    # Its checkpoint is kept and listed in OpenAI's shape.
    events = list(alice.fine_tuning.jobs.list_events(job.id))
    stop = next(e for e in events if e.event_type == "status" and e.data["status"] == "paused")
    name, step = stop.data["checkpoint"], stop.data["step"]
    assert (service.artifact_dir / "work" / job.id / job.id / "checkpoints" / name / "meta.json").is_file()
    assert step < 30
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].id.endswith(name) and checkpoints[0].id.startswith("ftckpt-")
    assert checkpoints[0].step_number == step
    assert [k.step_number for k in checkpoints] == sorted((k.step_number for k in checkpoints), reverse=True)
    assert all(k.created_at > 0 and k.fine_tuning_job_id == job.id for k in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(f"ft:tiny-llama:citi:{job.id[6:18]}:ckpt-step-")
    if step > 0:
        assert isinstance(checkpoints[0].metrics.train_loss, float)
    trained_before = [e.data["step"] for e in events if e.type == "metrics"]

    resumed = alice.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "validating_files", "running", "succeeded")
    done = service.wait_status(job.id, TERMINAL, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    stored = set(service.redis.hkeys(f"citi:job:{job.id}"))  # paused and resumed: still only declared fields
    assert stored <= set(JobRecord.__annotations__), stored - set(JobRecord.__annotations__)
    with service.client("alice") as c:
        ours = c.get(f"/jobs/{job.id}/events", params={"limit": 1000}).json()["data"]
    flow = [e["data"]["status"] for e in ours if e["type"] == "status"]
    assert flow == ["queued", "validating_files", "running", "paused", "queued", "validating_files", "running",
                    "succeeded"], flow
    after = ours[[e["data"].get("reason") for e in ours].index("resumed"):]
    assert any(e["message"] == f"resuming from checkpoint {name}" for e in after)
    steps_after = [e["data"]["step"] for e in after if e["type"] == "progress" and e["data"]["stage"] != "importance"]
    assert steps_after[0] == step + 1 and steps_after[-1] == 30, (step, steps_after, trained_before)
    # A finished job's checkpoints are gone: OpenAI's list shows none; our own route keeps the records.
    assert alice.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with service.client("alice") as c:
        recorded = c.get(f"/jobs/{job.id}/checkpoints", params={"limit": 100}).json()["data"]
    assert name in [k["id"].split("-", 2)[2] for k in recorded]
    trained = [k for k in recorded if k["kind"] == "periodic"]
    assert trained and all(isinstance(k["metrics"]["train_loss"], float) for k in trained)
    assert all(k["metrics"]["step"] == k["step_number"] and k["fine_tuned_model_checkpoint"] ==
               f"{done['fine_tuned_model']}:ckpt-step-{k['step_number']}" for k in recorded)

    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.resume(job.id)
    assert err.value.code == "job_not_paused"
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.pause(job.id)
    assert err.value.code == "job_not_running"


def test_pausing_a_queued_job_is_refused_and_cancelling_a_paused_job_deletes_its_checkpoints(
        service, workers, uploaded, jobs):
    alice = client_for(service)
    queued = jobs.create(uploaded)  # no worker yet: it stays queued
    with pytest.raises(openai.BadRequestError) as err:
        alice.fine_tuning.jobs.pause(queued.id)
    assert (err.value.code, err.value.body["param"]) == ("job_not_running", "job_id")
    assert "queued" in err.value.message
    assert alice.fine_tuning.jobs.cancel(queued.id).status == "cancelled"

    workers.start("w-pause-cancel")
    job = jobs.create(uploaded, extra_body={"budget": {"max_steps": 30}, "checkpoint_every": 2, "method": {
        "type": "citi", "hyperparameters": {**TINY_HYPERPARAMETERS, "eval_examples": 0}}})
    service.wait_status(job.id, ("running", *TERMINAL), timeout=120)
    alice.fine_tuning.jobs.pause(job.id)
    assert service.wait_status(job.id, ("paused", *TERMINAL), timeout=120)["status"] == "paused"
    work = service.artifact_dir / "work" / job.id
    assert list(work.glob("*/checkpoints/*/meta.json"))
    assert alice.fine_tuning.jobs.list(limit=5, extra_query={"status": "paused"}).data[0].id == job.id

    cancelled = alice.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert not work.exists() and not (service.artifact_dir / "jobs" / job.id).exists()
    assert alice.fine_tuning.jobs.checkpoints.list(job.id).data == []
    assert not service.redis.sismember(f"citi:active:{'alice'}", job.id)
    with pytest.raises(openai.BadRequestError):
        alice.fine_tuning.jobs.resume(job.id)


def test_a_lora_model_is_continued_as_a_full_job_on_it_and_a_citi_model_is_refused(service, workers, uploaded,
                                                                                     citi_job):
    import json

    workers.start("w-continue")
    alice = client_for(service)
    parent = alice.fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded, suffix="first",
                                           extra_body={"budget": {"max_steps": 3}, "method": {
                                               "type": "lora", "hyperparameters": TINY_HYPERPARAMETERS}})
    parent = service.wait_status(parent.id, TERMINAL, timeout=300)
    assert parent["status"] == "succeeded", parent
    model = parent["fine_tuned_model"]

    cases = [
        ({"model": citi_job["fine_tuned_model"]}, "model_not_continuable", "model"),
        ({"model": model}, "model_not_continuable", "method.type"),  # citi (the default) on top: not servable
        ({"model": model, "method": {"type": "supervised"}}, "model_not_continuable", "method.type"),
        ({"model": "ft:tiny-llama:nobody:000000000000"}, "model_not_found", "model"),
    ]
    for kwargs, code, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            alice.fine_tuning.jobs.create(training_file=uploaded, **kwargs)
        assert (err.value.code, err.value.body["param"]) == (code, param), kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client_for(service, "bob").fine_tuning.jobs.create(model=model, training_file=uploaded,
                                                           extra_body={"method": {"type": "full"}})
    assert err.value.code == "model_not_found"  # another tenant's model looks like none

    job = alice.fine_tuning.jobs.create(model=model, training_file=uploaded, suffix="second", extra_body={
        "budget": {"max_steps": 3}, "method": {"type": "full", "hyperparameters": TINY_HYPERPARAMETERS}})
    assert job.model == model and job.to_dict()["base_model"] == service.model_dir
    done = service.wait_status(job.id, TERMINAL, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["fine_tuned_model"].startswith("ft:tiny-llama:second:")
    assert any(e.message.startswith(f"building the starting model: {model}")
               for e in alice.fine_tuning.jobs.list_events(job.id, limit=1000).data)
    listed = {m.id: m for m in alice.models.list()}
    assert listed[done["fine_tuned_model"]].to_dict()["parent"] == model
    adapter = service.artifact_dir / "jobs" / job.id / "adapter"
    card = json.loads((adapter / "citi_job.json").read_text())
    assert (card["method"], card["base_model"], card["continued_from"]) == ("full", service.model_dir, model)
    assert (adapter / "config.json").is_file()  # a whole model, served without its parent

    # It started from the parent's weights merged into the base, not from the base.
    from pathlib import Path

    from safetensors.torch import load_file

    from citi_engine.export import export_model

    merged = export_model(service.artifact_dir / "jobs" / parent["id"] / "adapter", service.artifact_dir / "merged",
                          base=service.model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    base = load_file(str(Path(service.model_dir) / "model.safetensors"))[name]
    start = load_file(str(merged / "model.safetensors"))[name]
    tuned = load_file(str(adapter / "model.safetensors"))[name]
    assert (start - base).abs().max() > 0, "the parent's LoRA is in the starting weights"
    assert (tuned - start).abs().max() < (tuned - base).abs().max()


def test_result_files_go_with_their_fine_tuned_model(service, citi_job):
    alice = client_for(service)
    archive_bytes = alice.files.retrieve(citi_job["result_files"][0]).bytes
    usage = service.redis.hgetall("citi:usage:alice")
    alice.models.delete(citi_job["fine_tuned_model"])
    for file_id in citi_job["result_files"]:
        with pytest.raises(openai.NotFoundError):
            alice.files.retrieve(file_id)
    assert not set(citi_job["result_files"]) & {f.id for f in alice.files.list(purpose="fine-tune-results")}
    assert alice.fine_tuning.jobs.retrieve(citi_job["id"]).result_files == []
    after = service.redis.hgetall("citi:usage:alice")
    assert after["files"] == usage["files"], "result files never counted as uploads"
    assert int(usage["bytes"]) - int(after["bytes"]) > archive_bytes, "the archive counted, and freed, with the job"
