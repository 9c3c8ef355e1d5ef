"""OpenAI's job fields, model deletion, request ids and list filters, driven through the official ``openai``
client against the real API (and, for a fine-tuned model, a real Celery worker training a tiny model)."""

from __future__ import annotations

import httpx
import openai
import pytest

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
