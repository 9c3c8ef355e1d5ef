"""Bad input never breaks the service: schemathesis over every operation of ``/openapi.json``, fuzzed
uploads (hypothesis), path traversal in file names, ids and model specs, and no pickle anywhere user
data is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tests.reliability.conftest import ROOT, auth, record_fault

pytestmark = pytest.mark.service

SCHEMATHESIS_EXAMPLES = 4
UPLOAD_EXAMPLES = 120
_counts = {"schemathesis_cases": 0, "server_errors": 0, "upload_cases": 0, "upload_server_errors": 0}


def _record() -> None:
    record_fault("fuzz", **_counts)


def test_every_operation_answers_without_5xx_and_as_documented(service):
    """Generated valid and invalid requests for every operation in /openapi.json, with a valid key."""
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    failures: list[str] = []
    labels: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, failures)
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                pass
    _record()
    assert len(labels) >= 15 and "POST /v1/files" in labels and "GET /jobs/{job_id}/events" in labels, labels
    assert failures == []


def _fuzz(operation, mode, failures: list[str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def call(case) -> None:
        response = case.call(headers=auth(), timeout=30)
        _counts["schemathesis_cases"] += 1
        if _inference_not_configured(operation.label, response):
            return
        if response.status_code >= 500:
            _counts["server_errors"] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        except Exception as exc:  # collected: one report of every operation that misbehaves
            failures.append(f"{operation.label} ({mode.value}): {response.status_code} "
                            f"{response.text[:200]!r}: {str(exc)[:300]}")

    call()


def _inference_not_configured(label: str, response) -> bool:
    """The chat route's 503 when no inference server is configured (the service fixture runs none)."""
    if "chat/completions" not in label or response.status_code != 503:
        return False
    return response.json()["error"]["code"] == "inference_unavailable"


# -- uploads --------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
_wrong_examples = st.fixed_dictionaries({}, optional={
    "messages": _json_values | st.lists(st.fixed_dictionaries({"role": st.text(max_size=10), "content": _json_values})),
    "tools": _json_values, "ground_truth": _json_values})


def _lines(values) -> bytes:
    return b"".join(json.dumps(v).encode() + b"\n" for v in values)


_uploads = st.one_of(
    st.binary(min_size=1, max_size=4000),  # binary
    st.text(min_size=1, max_size=2000).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(_wrong_examples, min_size=1, max_size=9).map(_lines),  # wrong types and shapes, too few
    st.lists(_json_values, min_size=1, max_size=12).map(_lines),  # valid JSON, not examples
    st.text(min_size=1, max_size=200).map(lambda s: ("{" + s + "\n").encode("utf-8", "surrogatepass")),  # broken
    st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"]).map(  # odd encodings of a valid line
        lambda enc: (json.dumps({"messages": [{"role": "user", "content": "héllo ünïcode"}]}, ensure_ascii=False)
                     + "\n").encode(enc)),
    st.integers(50_000, 400_000).map(lambda n: b'{"messages": [{"role": "user", "content": "' + b"a" * n + b'"}]}\n'),
)


def test_fuzzed_uploads_get_4xx_and_store_nothing(service):
    with service.client("bob") as c:
        before = c.get("/v1/files", params={"limit": 10000}).json()["data"]
        stored_before = sorted(p.name for p in (service.artifact_dir / "files").glob("*")) \
            if (service.artifact_dir / "files").is_dir() else []

        @given(data=_uploads, name=st.sampled_from(["t.jsonl", "../../x.jsonl", "/etc/passwd", "a\x00b", "é.jsonl"]))
        @settings(max_examples=UPLOAD_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def upload(data: bytes, name: str) -> None:
            r = c.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
            _counts["upload_cases"] += 1
            if r.status_code >= 500:
                _counts["upload_server_errors"] += 1
            _record()
            assert 400 <= r.status_code < 500, (r.status_code, r.text[:500], data[:200])
            assert r.json()["error"]["message"]

        upload()
        assert c.get("/v1/files", params={"limit": 10000}).json()["data"] == before
    stored_after = sorted(p.name for p in (service.artifact_dir / "files").glob("*")) \
        if (service.artifact_dir / "files").is_dir() else []
    assert stored_after == stored_before


# -- path traversal -------------------------------------------------------------------------------


def test_a_traversing_file_name_is_only_a_label(service, tmp_path):
    from tests.service.conftest import to_jsonl, training_lines

    target = tmp_path / "escaped.jsonl"
    name = "../" * 12 + str(target).lstrip("/")
    with service.client("bob") as c:
        r = c.post("/v1/files", files={"file": (name, to_jsonl(training_lines()))}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        assert re.fullmatch(r"file-[0-9a-f]{24}", file_id)
        assert not target.exists()
        stored = [p for p in service.artifact_dir.rglob("*") if p.is_file() and file_id in p.name]
        assert [p.relative_to(service.artifact_dir).as_posix() for p in stored] == [f"files/{file_id}.jsonl"]
        assert c.delete(f"/v1/files/{file_id}").status_code == 200


@pytest.mark.parametrize("bad_id", ["..", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e",
                                    "file-..%2F..%2Fapi.log", "/etc/passwd"])
def test_traversing_ids_are_404_and_read_nothing(service, bad_id):
    with service.client("alice") as c:
        for path in (f"/v1/files/{bad_id}", f"/v1/files/{bad_id}/content", f"/jobs/{bad_id}",
                     f"/jobs/{bad_id}/adapter", f"/jobs/{bad_id}/events", f"/jobs/{bad_id}/report"):
            r = c.get(path)
            assert r.status_code in (400, 404, 405), (path, r.status_code, r.text[:300])
            assert "root:" not in r.text  # nothing of /etc/passwd


def test_model_specs_outside_the_model_dirs_are_refused(service, uploaded, tmp_path):
    model_root = Path(service.model_dir).parent
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    specs = [str(model_root / ".." / ".." / "etc"), "/etc", "../../../../etc/passwd", str(outside),
             str(model_root / "tiny-llama" / ".." / ".." / outside.name), "file:///etc/passwd",
             "~/.ssh", str(model_root) + "/../" + Path(service.model_dir).name + "/../../../../tmp"]
    with service.client("alice") as c:
        for spec in specs:
            r = c.post("/jobs", json=service.job_body(uploaded, model=spec))
            assert r.status_code == 400, (spec, r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["param"] == "model" and error["message"], error


# -- no pickle ------------------------------------------------------------------------------------

_PRODUCT_DIRS = ("citi_engine", "citi_service", "api", "worker", "bench", "scripts")


def _product_sources():
    for top in _PRODUCT_DIRS:
        yield from sorted((ROOT / top).rglob("*.py"))


def test_no_code_loads_pickles():
    offending = []
    for path in _product_sources():
        text = path.read_text(errors="replace")
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end():call.end() + 300].split(")")[0]
            if "weights_only=True" not in args:
                offending.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
        for pattern in (r"\bpickle\.loads?\(", r"\bcloudpickle\b", r"\bdill\b", r"allow_pickle\s*=\s*True",
                        r"\bjoblib\.load\(", r"\bmarshal\.loads?\(", r"use_safetensors\s*=\s*False"):
            if re.search(pattern, text):
                offending.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert offending == []
    assert any("torch.load(" in p.read_text() for p in _product_sources()), "the scan saw the checkpoint loader"


def test_the_celery_workers_accept_json_only():
    from worker.celery_app import celery_app

    assert celery_app.conf.accept_content == ["json"] and celery_app.conf.task_serializer == "json"

