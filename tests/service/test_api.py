"""The API against a real uvicorn process and Redis, without workers: files, job submission rules, auth
and ownership on every route, idempotency, limits, estimate, metrics, error shapes, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.service.conftest import KEYS, MAX_UPLOAD, ROOT, to_jsonl, training_lines

pytestmark = pytest.mark.service

DUMMY = {"file_id": "file-000000000000000000000000", "job_id": "ftjob-000000000000000000000000"}


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"code", "param", "message", "type"}, err
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def cancel_all(service, who: str = "alice") -> None:
    """Leave no queued job behind for later tests' workers."""
    with service.client(who) as c:
        for status in ("queued", "validating_files", "running"):
            for job in c.get("/jobs", params={"status": status, "limit": 100}).json()["data"]:
                c.post(f"/jobs/{job['id']}/cancel")


def routes(service) -> list[tuple[str, str]]:
    spec = httpx.get(service.url + "/openapi.json").json()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


def fill(path: str, ids: dict) -> str:
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    return path


# -- process -------------------------------------------------------------------------------------


def test_api_process_never_imports_torch(service, uploaded):
    code = f"""
import sys, time
t = time.perf_counter()
from fastapi.testclient import TestClient
import api.main
c = TestClient(api.main.app, headers={{"Authorization": "Bearer {KEYS['alice']}"}})
started = time.perf_counter() - t
assert c.get("/healthz").status_code == 200
r = c.post("/v1/files", files={{"file": ("t.jsonl", open(sys.argv[1], "rb"))}})
assert r.status_code == 200, r.text
body = {{"model": "{service.model_dir}", "training_file": r.json()["id"], "budget": {{"max_steps": 3}}}}
assert c.post("/jobs/estimate", json=body).status_code == 200
job = c.post("/jobs", json=body).json()
assert c.get("/jobs/" + job["id"] + "/events").status_code == 200
assert c.post("/jobs/" + job["id"] + "/cancel").json()["status"] == "cancelled"
print(started, "torch" in sys.modules, "transformers" in sys.modules)
"""
    data = ROOT / "examples" / "tools_train.jsonl"
    out = subprocess.run([sys.executable, "-c", code, str(data)], cwd=ROOT, env=service.env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    started, torch_loaded, transformers_loaded = out.stdout.split()[-3:]
    assert torch_loaded == "False" and transformers_loaded == "False"
    assert float(started) < 10, f"the API took {started} s to import"
    # The live server too, after serving uploads and jobs: no torch library mapped into it.
    maps = open(f"/proc/{service.proc.pid}/maps").read()
    assert "libtorch" not in maps


def test_openapi_and_docs_are_served_and_document_our_error_shape(service):
    spec = httpx.get(service.url + "/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/files", "/jobs", "/v1/fine_tuning/jobs", "/jobs/{job_id}/events", "/jobs/{job_id}/adapter",
                 "/jobs/estimate", "/v1/fine_tuning/jobs/{job_id}/cancel", "/healthz", "/metrics"):
        assert path in paths, path
    for ops in paths.values():
        for op in ops.values():
            assert "422" not in op["responses"], "validation errors are answered as 400"
    docs = httpx.get(service.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    # Public by decision (no key above), and the description and the README say so.
    assert "/openapi.json" in spec["info"]["description"] and "public" in spec["info"]["description"]
    readme = (ROOT / "README.md").read_text()
    assert "Public, by decision: `/healthz`, the API's description\n(`/openapi.json` and `/docs`" in readme


def test_unknown_route_and_method_answer_in_the_error_shape(service):
    with service.client("alice") as c:
        assert_error(c.get("/nope"), 404, "not_found")
        assert_error(c.put("/jobs"), 405, "method_not_allowed")
        err = assert_error(c.post("/jobs", content=b"{not json", headers={"content-type": "application/json"}), 400,
                           "invalid_json", "body")
        assert "not valid JSON at character 1" in err["message"], err
        assert_error(c.post("/jobs", content=b"[1, 2]", headers={"content-type": "application/json"}), 400,
                     "invalid_request", "body")
        huge = {"training_file": "file-x", "metadata": {"k": "v" * 2_000_000}}
        assert_error(c.post("/jobs", json=huge), 413, "request_too_large")


# -- auth and ownership --------------------------------------------------------------------------


def test_every_route_but_health_needs_a_valid_key(service):
    checked = 0
    with httpx.Client(base_url=service.url) as anonymous:
        for method, path in routes(service):
            if path == "/healthz" or path == "/ui/session":
                continue  # health is public; /ui/session is the sign-in itself (tests/ui covers it)
            url = fill(path, DUMMY)
            assert_error(anonymous.request(method, url), 401, "missing_api_key")
            assert_error(anonymous.request(method, url, headers={"Authorization": "Bearer sk-wrong"}), 401,
                         "invalid_api_key")
            assert_error(anonymous.request(method, url, headers={"Authorization": "Basic abc"}), 401,
                         "invalid_authorization")
            checked += 1
        assert checked >= 25
        assert anonymous.get("/healthz").json()["status"] == "ok"


def test_every_resource_route_is_404_for_another_tenant_and_shared_by_a_tenants_keys(service, uploaded):
    with service.client("alice") as alice:
        job = alice.post("/jobs", json=service.job_body(uploaded)).json()
        assert job["status"] == "queued"
    ids = {"file_id": uploaded, "job_id": job["id"]}
    checked = 0
    with service.client("bob") as bob:
        for method, path in routes(service):
            if "{" not in path:
                continue
            kwargs = {"json": {}} if method == "POST" else {}
            assert_error(bob.request(method, fill(path, ids), **kwargs), 404)
            checked += 1
        assert checked >= 12
        # Nor can bob use alice's file in a job, or see it or her job in his lists.
        assert_error(bob.post("/jobs", json=service.job_body(uploaded)), 404, "file_not_found", "training_file")
        assert uploaded not in [f["id"] for f in bob.get("/v1/files").json()["data"]]
        assert job["id"] not in [j["id"] for j in bob.get("/jobs").json()["data"]]
    with service.client("alice2") as alice2:  # another key of the same tenant sees everything
        assert alice2.get(f"/jobs/{job['id']}").json()["id"] == job["id"]
        assert alice2.get(f"/v1/files/{uploaded}").status_code == 200
        assert alice2.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


# -- files ---------------------------------------------------------------------------------------


def test_upload_list_get_content_and_delete_a_file(service):
    data = to_jsonl(training_lines(12, 4))
    with service.client("alice") as c:
        r = c.post("/v1/files", files={"file": ("mine.jsonl", data)}, data={"purpose": "fine-tune"})
        f = r.json()
        assert r.status_code == 200 and f["object"] == "file" and f["id"].startswith("file-")
        assert (f["bytes"], f["filename"], f["purpose"], f["status"]) == (len(data), "mine.jsonl", "fine-tune",
                                                                          "processed")
        assert (f["n_examples"], f["n_tool"], f["n_general"], f["format"]) == (16, 12, 4, "train")
        assert c.get(f"/v1/files/{f['id']}").json() == f
        assert c.get(f"/v1/files/{f['id']}/content").content == data
        listed = c.get("/v1/files", params={"limit": 1}).json()
        assert listed["data"][0]["id"] == f["id"]  # newest first
        assert c.delete(f"/v1/files/{f['id']}").json() == {"id": f["id"], "object": "file", "deleted": True}
        assert_error(c.get(f"/v1/files/{f['id']}"), 404, "file_not_found")
    assert not (service.artifact_dir / "files" / f"{f['id']}.jsonl").exists()


def test_a_bad_upload_is_refused_with_every_bad_line_and_not_stored(service):
    lines = [json.dumps(x) for x in training_lines(10, 2)]
    lines.insert(1, '{"messages": [')                                                    # line 2
    lines.insert(3, json.dumps({"messages": [{"role": "robot", "content": "hi"}]}))     # line 4
    lines.insert(6, json.dumps(["not", "an", "object"]))                                # line 7
    with service.client("alice") as c:
        before = c.get("/v1/files", params={"limit": 10000}).json()["data"]
        r = c.post("/v1/files", files={"file": ("bad.jsonl", ("\n".join(lines) + "\n").encode())})
        err = assert_error(r, 400, "invalid_file", "file")
        found = {(d["line"], d["code"]) for d in err["details"]}
        assert {line for line, _ in found} == {2, 4, 7}, err["details"]
        assert {(2, "invalid_json"), (4, "unknown_role"), (7, "not_an_object")} <= found
        assert all(d["message"] for d in err["details"])
        assert c.get("/v1/files", params={"limit": 10000}).json()["data"] == before
        # The project's own example of a bad file: every line is reported.
        sample = (ROOT / "examples" / "bad_example.jsonl").read_bytes()
        err = assert_error(c.post("/v1/files", files={"file": ("b.jsonl", sample)}), 400, "invalid_file")
        assert len({d["line"] for d in err["details"] if d["line"]}) >= 5
        assert_error(c.post("/v1/files", files={"file": ("e.jsonl", b"\n\n")}), 400, "invalid_file")
        assert_error(c.post("/v1/files", files={"file": ("x.jsonl", to_jsonl(training_lines()))},
                            data={"purpose": "assistants"}), 400, "invalid_purpose", "purpose")


def test_an_upload_over_the_size_limit_gets_413_declared_or_streamed(service):
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (MAX_UPLOAD + 1000) + b'"}]}\n'
    with service.client("alice") as c:
        assert_error(c.post("/v1/files", files={"file": ("big.jsonl", big)}), 413, "file_too_large")

        def chunks():  # no Content-Length: the limit must hold while reading
            boundary = b"--xyz\r\n"
            yield boundary + b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
            for start in range(0, len(big), 65536):
                yield big[start:start + 65536]
            yield b"\r\n--xyz--\r\n"

        r = c.post("/v1/files", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert_error(r, 413, "file_too_large")
        # Just under the limit the same kind of file is judged on its content, not its size.
        small = to_jsonl(training_lines())
        assert c.post("/v1/files", files={"file": ("ok.jsonl", small)}).status_code == 200


# -- jobs ----------------------------------------------------------------------------------------


def test_a_tool_test_file_is_accepted_as_validation_file_only(service, uploaded):
    with service.client("alice") as c:
        test_file = c.post("/v1/files", files={"file": ("t.jsonl", (ROOT / "examples" / "tools_test.jsonl").read_bytes())})
        f = test_file.json()
        assert test_file.status_code == 200 and f["format"] == "test" and f["n_examples"] == 20
        assert_error(c.post("/jobs", json=service.job_body(f["id"])), 400, "invalid_file_format", "training_file")
        job = c.post("/jobs", json=service.job_body(uploaded, validation_file=f["id"])).json()
        assert job["validation_file"] == f["id"]
        c.post(f"/jobs/{job['id']}/cancel")


def test_job_requests_are_checked_completely_at_submit_time(service, uploaded, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    cases = [
        ({"training_file": "file-doesnotexist"}, 404, "file_not_found", "training_file"),
        ({"validation_file": "file-doesnotexist"}, 404, "file_not_found", "validation_file"),
        ({"model": str(outside)}, 400, "model_not_allowed", "model"),
        ({"model": "../../etc"}, 400, "model_not_allowed", "model"),
        ({"model": "meta-llama/Llama-3.1-8B-Instruct"}, 400, "model_not_allowed", "model"),
        ({"model": "no such model!"}, 400, "model_not_found", "model"),
        ({"method": {"type": "citi", "hyperparameters": {"learning_rate": 1}}}, 400, "invalid_parameters",
         "method.hyperparameters"),
        ({"method": {"type": "citi", "hyperparameters": {"batch_size": 0}}}, 400, "invalid_parameters",
         "method.hyperparameters.batch_size"),
        ({"method": {"type": "dpo"}}, 400, "invalid_request", "method.type"),
        ({"components": {"molora_fraction": 1.5}}, 400, "invalid_request", "components.molora_fraction"),
        ({"components": {"molora_fraction": 0.7, "uco_fraction": 0.5}}, 400, "invalid_parameters",
         "components.uco_fraction"),
        ({"budget": {"max_steps": 2}}, 400, "invalid_budget", "budget.max_steps"),
        ({"budget": {"max_steps": -1}}, 400, "invalid_request", "budget.max_steps"),
        ({"suffix": "no spaces please"}, 400, "invalid_request", "suffix"),
        ({"metadata": {str(i): "x" for i in range(17)}}, 400, "invalid_metadata", "metadata"),
        ({"epochs": 3}, 400, "invalid_request", "epochs"),
    ]
    with service.client("alice") as c:
        for override, status, code, param in cases:
            body = {**service.job_body(uploaded), **override}
            err = assert_error(c.post("/jobs", json=body), status, code, param)
            assert len(err["message"]) > 20, err
        assert c.get("/jobs", params={"status": "queued"}).json()["data"] == []


def _hyper(**values) -> dict:
    return {"method": {"type": "citi", "hyperparameters": {**values}}}


# JSON numbers that are not finite in Python: 1e400 overflows to inf, NaN and Infinity are JSON5 literals that
# Python's json (and so the API) reads. The raw text is sent, since JSON encoders refuse to write them.
NON_FINITE = [
    ('"budget": {"max_seconds": Infinity}', "budget.max_seconds"),
    ('"budget": {"max_steps": 1e400}', "budget.max_steps"),
    ('"method": {"type": "citi", "hyperparameters": {"lr_molora": 1e400}}', "method.hyperparameters.lr_molora"),
    ('"method": {"type": "citi", "hyperparameters": {"routing_beta": NaN}}', "method.hyperparameters.routing_beta"),
    ('"hyperparameters": {"lr_train": -Infinity}', "method.hyperparameters.lr_train"),
    ('"components": {"alpha": NaN}', "components.alpha"),
    ('"test_fraction": NaN', "test_fraction"),
]


def test_every_numeric_setting_is_finite_and_bounded_at_submit_time(service, uploaded):
    huge = [
        ({"budget": {"max_steps": 1e30}}, "budget.max_steps"),
        ({"budget": {"max_steps": 2**63}}, "budget.max_steps"),
        ({"budget": {"max_tokens": 10**13}}, "budget.max_tokens"),
        ({"budget": {"max_seconds": 1e12}}, "budget.max_seconds"),
        (_hyper(batch_size=10**12), "method.hyperparameters.batch_size"),
        (_hyper(pack_tokens=2**40), "method.hyperparameters.pack_tokens"),
        (_hyper(replay_examples=10**9), "method.hyperparameters.replay_examples"),
        (_hyper(gradient_accumulation_steps=10**6), "method.hyperparameters.gradient_accumulation_steps"),
        (_hyper(epochs_molora=1e9), "method.hyperparameters.epochs_molora"),
        (_hyper(lr_molora=5.0), "method.hyperparameters.lr_molora"),
        ({"components": {"num_experts": 10**6}}, "components.num_experts"),
        ({"components": {"rank": 2**20}}, "components.rank"),
        ({"checkpoint_every": 2**63}, "checkpoint_every"),
    ]
    with service.client("alice") as c:
        before = len(c.get("/jobs", params={"limit": 100}).json()["data"])
        for override, param in huge:
            err = assert_error(c.post("/jobs", json={**service.job_body(uploaded), **override}), 400, param=param)
            assert err["code"] in ("invalid_request", "invalid_parameters"), err
        body = service.job_body(uploaded)
        del body["method"], body["budget"]
        for fragment, param in NON_FINITE:
            raw = json.dumps(body)[:-1] + ", " + fragment + "}"
            r = c.post("/jobs", content=raw.encode(), headers={"content-type": "application/json"})
            err = assert_error(r, 400, param=param)
            assert "finite" in err["message"], err
        assert len(c.get("/jobs", params={"limit": 100}).json()["data"]) == before  # nothing was created
        # the ranges are documented in the schema
        spec = httpx.get(service.url + "/openapi.json").json()["components"]["schemas"]
        assert spec["BudgetIn"]["properties"]["max_steps"]["anyOf"][0]["maximum"] == 10_000_000


def test_out_of_range_query_values_headers_and_seeds_are_400_naming_the_param(service, uploaded):
    with service.client("alice") as c:
        job_id = c.post("/jobs", json=service.job_body(uploaded)).json()["id"]
        c.post(f"/jobs/{job_id}/cancel")
        assert_error(c.get("/jobs", params={"status": "bogus"}), 400, "invalid_request", "status")
        assert [j["id"] for j in c.get("/jobs", params={"status": "cancelled"}).json()["data"]][:1] == [job_id]
        for after in (str(2**63), "1" + "0" * 30):
            assert_error(c.get(f"/jobs/{job_id}/events", params={"after": after}), 400, "invalid_request", "after")
            assert_error(c.get(f"/jobs/{job_id}/events", params={"after": after, "stream": "true"}), 400,
                         "invalid_request", "after")
        stream = {"Accept": "text/event-stream"}
        assert_error(c.get(f"/jobs/{job_id}/events", headers={**stream, "Last-Event-ID": "9" * 40}), 400,
                     "invalid_request", "Last-Event-ID")
        with c.stream("GET", f"/jobs/{job_id}/events", headers={**stream, "Last-Event-ID": str(2**63 - 1)}) as r:
            assert r.status_code == 200 and "retry" in r.read().decode()  # the largest seq: a stream with nothing after
        chat = {"model": service.model_dir, "messages": [{"role": "user", "content": "hi"}]}
        for seed in (2**63, -(2**63) - 1, 10**30):
            assert_error(c.post("/v1/chat/completions", json={**chat, "seed": seed}), 400, "invalid_request", "seed")


def test_idempotency_key_returns_the_same_job_and_refuses_a_different_body(service, uploaded):
    with service.client("alice") as c:
        body = service.job_body(uploaded)
        first = c.post("/jobs", json=body, headers={"Idempotency-Key": "same-key"}).json()
        again = c.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "same-key"}).json()
        assert again["id"] == first["id"]
        assert_error(c.post("/jobs", json={**body, "seed": 2}, headers={"Idempotency-Key": "same-key"}), 409,
                     "idempotency_key_reused")
        other = c.post("/jobs", json=body, headers={"Idempotency-Key": "other-key"}).json()
        assert other["id"] != first["id"]
        plain = [c.post("/jobs", json=body).json()["id"] for _ in range(2)]
        assert len(set(plain)) == 2, "without a key every request creates a job"
    cancel_all(service)


def test_queue_positions_cancel_delete_and_pagination(service, uploaded):
    with service.client("alice") as c:
        ids = [c.post("/jobs", json=service.job_body(uploaded)).json()["id"] for _ in range(3)]
        positions = [c.get(f"/jobs/{i}").json()["queue_position"] for i in ids]
        assert positions == sorted(positions) and positions[1] == positions[0] + 1
        assert_error(c.delete(f"/jobs/{ids[0]}"), 409, "job_not_finished")
        assert_error(c.get(f"/jobs/{ids[0]}/adapter"), 409, "adapter_not_ready")
        cancelled = c.post(f"/jobs/{ids[0]}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
        assert c.get(f"/jobs/{ids[1]}").json()["queue_position"] == positions[1] - 1
        events = c.get(f"/jobs/{ids[0]}/events").json()["data"]
        assert [e["data"]["status"] for e in events] == ["queued", "cancelled"]

        page1 = c.get("/jobs", params={"limit": 2}).json()
        assert [j["id"] for j in page1["data"]] == [ids[2], ids[1]] and page1["has_more"]
        page2 = c.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
        assert page2["data"][0]["id"] == ids[0]
        only = c.get("/jobs", params={"status": "cancelled", "limit": 100}).json()["data"]
        assert ids[0] in [j["id"] for j in only] and all(j["status"] == "cancelled" for j in only)
        assert c.delete(f"/jobs/{ids[0]}").json()["deleted"] is True
        assert_error(c.get(f"/jobs/{ids[0]}"), 404, "job_not_found")
        # A finished job's file can be deleted; one an unfinished job uses cannot.
        assert_error(c.delete(f"/v1/files/{uploaded}"), 409, "file_in_use")
    cancel_all(service)


def test_a_tenant_cannot_have_more_unfinished_jobs_than_its_limit(service):
    with service.client("bob") as c:
        file_id = c.post("/v1/files", files={"file": ("t.jsonl", to_jsonl(training_lines()))}).json()["id"]
        ids = [c.post("/jobs", json=service.job_body(file_id)).json()["id"] for _ in range(6)]
        err = assert_error(c.post("/jobs", json=service.job_body(file_id)), 429, "too_many_active_jobs")
        assert "6" in err["message"]
        c.post(f"/jobs/{ids[0]}/cancel")
        assert c.post("/jobs", json=service.job_body(file_id)).status_code == 200
    cancel_all(service, "bob")


def test_estimate_counts_tokens_steps_time_and_memory(service, uploaded):
    with service.client("alice") as c:
        body = service.job_body(uploaded, budget={"max_steps": 3})
        est = c.post("/jobs/estimate", json=body).json()
        assert est["object"] == "fine_tuning.job.estimate"
        assert est["tokens"]["counted_with"] == "tokenizer" and est["tokens"]["total"] > 24 * 10
        assert est["steps"]["total"] == 3 and set(est["steps"]["per_stage"]) == {"router_pretraining", "molora", "uco"}
        assert est["budget"]["fits"] is True and est["budget"]["limited_by"] == ["max_steps"]
        assert est["parameters"] > 3_000_000 and est["memory"]["fits"] is True
        assert est["estimated_seconds"] > 0
        unbounded = c.post("/jobs/estimate", json=service.job_body(uploaded, budget=None)).json()
        assert unbounded["steps"]["total"] == unbounded["steps"]["without_budget"] > 3
        assert unbounded["budget"]["limited_by"] == []
        tight = c.post("/jobs/estimate", json=service.job_body(uploaded, budget={"max_seconds": 0.001})).json()
        assert tight["budget"]["fits"] is False and "max_seconds" in tight["budget"]["limited_by"]
        # The built-in model, from its known shape: 135M parameters, fits an 80 GB GPU.
        builtin = c.post("/jobs/estimate", json={**body, "model": "smollm2-135m-instruct"}).json()
        assert 130e6 < builtin["parameters"] < 140e6 and builtin["memory"]["fits"] is True
        full8b = builtin["memory"]["estimated_gb"]
        assert 0 < full8b < 80


def test_metrics_report_jobs_queue_and_latency(service, uploaded):
    with service.client("alice") as c:
        job = c.post("/jobs", json=service.job_body(uploaded)).json()
        text = c.get("/metrics").text
        assert 'citi_jobs{status="queued"}' in text
        depth = [line for line in text.splitlines() if line.startswith("citi_queue_depth ")]
        assert depth and float(depth[0].split()[1]) >= 1
        assert 'citi_http_request_duration_seconds_count{method="POST",route="/jobs",status="200"}' in text
        c.post(f"/jobs/{job['id']}/cancel")
    assert_error(httpx.get(service.url + "/metrics"), 401)


def test_events_stream_of_a_finished_job_replays_and_ends(service, uploaded):
    with service.client("alice") as c:
        job = c.post("/jobs", json=service.job_body(uploaded)).json()
        c.post(f"/jobs/{job['id']}/cancel")
        started = time.time()
        with c.stream("GET", f"/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}) as r:
            body = r.read().decode()
        assert time.time() - started < 3, "the stream of a finished job ends at once"
        assert "id: 1\nevent: status" in body and "id: 2\nevent: status" in body and '"cancelled"' in body
        with c.stream("GET", f"/jobs/{job['id']}/events", params={"stream": "true"},
                      headers={"Last-Event-ID": "1"}) as r:
            body = r.read().decode()
        assert "id: 1\n" not in body and "id: 2\n" in body


def test_the_official_openai_client_works_against_the_files_and_fine_tuning_routes(service, tmp_path):
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEYS["alice"], max_retries=0)
    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(training_lines()))
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == data.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    job = client.fine_tuning.jobs.create(model=service.model_dir, training_file=uploaded.id, seed=7,
                                         suffix="oai", extra_body={"budget": {"max_steps": 3}})
    assert job.status == "queued" and job.seed == 7 and job.training_file == uploaded.id
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=5).data]
    events = client.fine_tuning.jobs.list_events(job.id)
    assert events.data[0].message == "job created and queued"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service.url + "/v1", api_key="wrong", max_retries=0).files.list()
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="not a model!", training_file=uploaded.id)
    assert bad.value.code == "model_not_found"
    assert client.files.delete(uploaded.id).deleted is True


def test_deployment_limits_upload_storage_rate_and_allowed_models(service, tmp_path):
    from tests.service.conftest import claim_redis_db, release_redis_db, start_api, stop_process

    db = claim_redis_db()
    small, big = to_jsonl(training_lines(10, 2)), to_jsonl(training_lines(40, 10))
    assert len(big) > 2 * len(small)
    env = {**service.env, "REDIS_URL": f"redis://127.0.0.1:6379/{db}", "CITI_ARTIFACT_DIR": str(tmp_path / "a"),
           "CITI_MAX_FILES_PER_TENANT": "2", "CITI_MAX_STORAGE_BYTES_PER_TENANT": str(2 * len(small) + 100),
           "CITI_RATE_LIMIT_PER_MINUTE": "12", "CITI_ALLOWED_MODELS": "smollm2-135m-instruct"}
    proc, url = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}) as alice:
            ids = [alice.post("/v1/files", files={"file": (f"{i}.jsonl", small)}).json()["id"] for i in range(2)]
            assert_error(alice.post("/v1/files", files={"file": ("3.jsonl", small)}), 403, "file_quota_exceeded")
            alice.delete(f"/v1/files/{ids[0]}")
            assert_error(alice.post("/v1/files", files={"file": ("big.jsonl", big)}), 403, "storage_quota_exceeded")
            fourth = alice.post("/v1/files", files={"file": ("4.jsonl", small)})
            assert fourth.status_code == 200
            body = service.job_body(fourth.json()["id"])
            err = assert_error(alice.post("/jobs", json=body), 400, "model_not_allowed", "model")
            assert "smollm2-135m-instruct" in err["message"]
            job = alice.post("/jobs", json={**body, "model": "smollm2-135m-instruct"})
            assert job.status_code == 200, job.text
            alice.post(f"/jobs/{job.json()['id']}/cancel")

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['bob']}"}) as bob:
            # 26 requests cross at most one minute boundary, so one window sees more than 12.
            answers = [bob.get("/v1/files") for _ in range(26)]
        limited = [r for r in answers if r.status_code == 429]
        assert limited and all(r.status_code in (200, 429) for r in answers)
        err = assert_error(limited[0], 429, "rate_limit_exceeded")
        assert 1 <= int(limited[0].headers["Retry-After"]) <= 60 and "retry" in err["message"]
    finally:
        stop_process(proc)
        release_redis_db(db)


def test_event_streams_are_limited_per_tenant_and_per_process_with_a_429_before_they_start(service, tmp_path):
    from tests.service.conftest import start_api, stop_process

    env = {**service.env, "CITI_MAX_STREAMS_PER_TENANT": "2", "CITI_MAX_STREAMS_PER_PROCESS": "3"}
    proc, url = start_api(env, tmp_path / "api-streams.log")
    jobs, opened = {}, []
    try:
        for who in ("alice", "bob"):
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[who]}"}, timeout=30) as c:
                f = c.post("/v1/files", files={"file": ("t.jsonl", to_jsonl(training_lines()))},
                           data={"purpose": "fine-tune"}).json()["id"]
                jobs[who] = c.post("/jobs", json=service.job_body(f)).json()["id"]  # stays queued: no worker here

        def open_stream(who: str):
            c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[who]}"}, timeout=30)
            r = c.send(c.build_request("GET", f"/jobs/{jobs[who]}/events",
                                       headers={"Accept": "text/event-stream"}), stream=True)
            opened.append((c, r))
            if r.status_code != 200:
                r.read()
            return r

        first, second = open_stream("alice"), open_stream("alice")
        assert first.status_code == second.status_code == 200
        lines = first.iter_lines()  # kept: dropping the iterator would close the stream
        assert next(lines).startswith("retry")  # live
        third = open_stream("alice")
        err = assert_error(third, 429, "too_many_streams")
        assert "CITI_MAX_STREAMS_PER_TENANT=2" in err["message"] and third.headers["retry-after"]
        assert open_stream("bob").status_code == 200  # another tenant is not starved by alice
        full = open_stream("bob")
        assert "CITI_MAX_STREAMS_PER_PROCESS=3" in assert_error(full, 429, "too_many_streams")["message"]
        # A stream that ends gives its place back.
        first.close()
        deadline = time.time() + 10
        while True:
            again = open_stream("alice")
            if again.status_code == 200 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert again.status_code == 200, again.read()
        # Polling the events is never limited.
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}) as c:
            assert c.get(f"/jobs/{jobs['alice']}/events").status_code == 200
            for who, job_id in jobs.items():
                httpx.post(f"{url}/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {KEYS[who]}"})
    finally:
        for c, r in opened:
            r.close()
            c.close()
        stop_process(proc)
    assert "Traceback" not in (tmp_path / "api-streams.log").read_text()


def test_wrong_keys_are_throttled_per_client_address_and_a_rate_limit_is_on_by_default(service, tmp_path):
    from citi_service.settings import Settings
    from tests.service.conftest import claim_redis_db, release_redis_db, start_api, stop_process

    assert Settings.model_fields["rate_limit_per_minute"].default == 600  # on unless turned off
    db = claim_redis_db()
    env = {**service.env, "REDIS_URL": f"redis://127.0.0.1:6379/{db}", "CITI_AUTH_FAILURES_PER_MINUTE": "3"}
    proc, url = start_api(env, tmp_path / "api-throttle.log")
    try:
        if time.time() % 60 > 45:  # the count is per minute: do not let the window turn mid-test
            time.sleep(61 - time.time() % 60)
        wrong, right = {"Authorization": "Bearer sk-a-guess"}, {"Authorization": f"Bearer {KEYS['alice']}"}
        assert httpx.get(url + "/v1/files", headers=right).status_code == 200
        for _ in range(3):
            assert_error(httpx.get(url + "/jobs", headers=wrong), 401, "invalid_api_key")
        err = assert_error(httpx.get(url + "/jobs", headers=wrong), 429, "too_many_failed_authentications")
        assert "more than 3 wrong keys" in err["message"]
        # From this address, every key now waits out the minute (a right guess would tell nothing), the
        # dashboard's sign-in included; requests without a key are still just 401, and health is public.
        r = httpx.get(url + "/jobs", headers=right)
        assert_error(r, 429, "too_many_failed_authentications")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert_error(httpx.post(url + "/ui/session", json={"key": KEYS["alice"]}), 429,
                     "too_many_failed_authentications")
        assert_error(httpx.get(url + "/jobs"), 401, "missing_api_key")
        assert httpx.get(url + "/healthz").status_code == 200
    finally:
        stop_process(proc)
        release_redis_db(db)
