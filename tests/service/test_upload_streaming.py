"""Uploads are validated a line at a time while they are stored: a file many times larger than a small memory
bound goes through a real ``uvicorn api.main:app`` process without its peak memory (``VmHWM``) growing past
the bound, and a bad or overlong line deep in a large file is still reported with its line number.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import KEYS, base_env, start_uvicorn, stop_process

pytestmark = pytest.mark.service

MB = 1024 * 1024
UPLOAD_MB = 24  # what the whole-file reader held at least twice (its bytes, then the lines split from them)
BOUND_MB = 12  # the growth of the API's peak memory that a line-at-a-time upload stays under
LINE_LIMIT = 1 * MB


def tool_schema_lines(target_bytes: int, *, distinct_tools: int = 64, tools_per_line: int = 12,
                      properties: int = 24) -> list[bytes]:
    """Valid training lines that each offer many large tool schemas (BFCL-like), about ``target_bytes`` in all.

    The tools are drawn from ``distinct_tools`` schemas, so validation checks each schema once and the test
    stays fast; every line is still parsed and checked whole.
    """
    tools = []
    for t in range(distinct_tools):
        props = {f"param_{t}_{p}": {"type": "string", "description": f"Parameter {p} of tool {t}: " + "x" * 120,
                                    "enum": [f"choice_{p}_{k}" for k in range(6)]} for p in range(properties)}
        tools.append({"type": "function", "function": {
            "name": f"tool_{t}", "description": f"Tool number {t}. " + "A long description. " * 20,
            "parameters": {"type": "object", "properties": props, "required": [f"param_{t}_0"]}}})
    lines, size, i = [], 0, 0
    while size < target_bytes:
        offered = [tools[(i + k) % distinct_tools] for k in range(tools_per_line)]
        name = offered[0]["function"]["name"]
        arg = next(iter(offered[0]["function"]["parameters"]["properties"]))
        line = json.dumps({"messages": [
            {"role": "user", "content": f"Request {i}: call the first tool."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
                "name": name, "arguments": json.dumps({arg: "choice_0_0"})}}]}], "tools": offered}).encode() + b"\n"
        lines.append(line)
        size += len(line)
        i += 1
    return lines


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (``VmHWM``), in MB."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def big_upload_api(tmp_path_factory, redis_db):
    """An API process of its own that takes uploads of 64 MB and lines of 1 MB."""
    base = tmp_path_factory.mktemp("upload-api")
    env = {**base_env(redis_db, base / "artifacts", base / "models"), "CITI_MAX_UPLOAD_BYTES": str(64 * MB),
           "CITI_MAX_UPLOAD_LINE_BYTES": str(LINE_LIMIT), "CITI_RATE_LIMIT_PER_MINUTE": "0"}
    proc, url = start_uvicorn("api.main:app", env, base / "api.log")
    yield proc, url, base
    stop_process(proc)


def _upload(url: str, data: bytes, name: str = "big.jsonl") -> httpx.Response:
    return httpx.post(url + "/v1/files", headers={"Authorization": f"Bearer {KEYS['alice']}"},
                      files={"file": (name, data)}, data={"purpose": "fine-tune"}, timeout=120)


def test_a_large_upload_is_validated_and_stored_within_a_small_memory_bound(big_upload_api):
    proc, url, base = big_upload_api
    lines = tool_schema_lines(UPLOAD_MB * MB)
    # Warm up: the first upload imports the validator and jsonschema; the bound is about the file, not them.
    assert _upload(url, b"".join(lines[:40]), "small.jsonl").status_code == 200
    data = b"".join(lines)
    assert len(data) >= 2 * BOUND_MB * MB
    rested = peak_rss_mb(proc.pid)

    r = _upload(url, data)
    grown = peak_rss_mb(proc.pid) - rested
    assert r.status_code == 200, r.text[:2000]
    f = r.json()
    assert (f["bytes"], f["n_examples"], f["n_tool"], f["format"]) == (len(data), len(lines), len(lines), "train")
    assert grown < BOUND_MB, f"the API's peak memory grew {grown:.1f} MB for a {len(data) / MB:.0f} MB upload"
    # Stored byte for byte.
    stored = base / "artifacts" / "files" / f"{f['id']}.jsonl"
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(data).digest()

    # The same file with a bad last line: refused with that line's number, nothing stored, memory still bounded.
    stored_before = sorted((base / "artifacts" / "files").iterdir())
    bad = data + b'{"messages": [{"role": "robot", "content": "hi"}]}\n'
    r = _upload(url, bad, "bad.jsonl")
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("invalid_file", "file"), r.text[:2000]
    assert {d["line"] for d in err["details"]} == {len(lines) + 1}
    assert "unknown_role" in {d["code"] for d in err["details"]}
    assert "on 1 line(s)" in err["message"]
    assert peak_rss_mb(proc.pid) - rested < BOUND_MB
    assert sorted((base / "artifacts" / "files").iterdir()) == stored_before


def test_an_overlong_line_and_a_late_test_marker_are_found_in_a_streamed_upload(big_upload_api):
    _, url, _ = big_upload_api
    good = tool_schema_lines(3 * MB)
    overlong = b'{"messages": [{"role": "user", "content": "' + b"y" * (2 * LINE_LIMIT) + b'"}]}\n'
    r = _upload(url, b"".join(good[:5]) + overlong + b"".join(good[5:]), "long.jsonl")
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_file", r.text[:2000]
    assert [(d["line"], d["code"]) for d in err["details"]] == [(6, "line_too_long")]
    assert f"longer than {LINE_LIMIT} bytes" in err["details"][0]["message"]

    # A tool test file is recognised by a ground_truth key wherever it first appears (here past the first MB).
    tools = json.loads(good[0])["tools"]
    case = {"messages": [{"role": "user", "content": "Call the first tool."}], "tools": tools,
            "ground_truth": [{tools[0]["function"]["name"]: {}}]}
    plain = {"messages": [{"role": "user", "content": "Call it."}, {"role": "assistant", "content": "Done."}],
             "tools": tools}
    rows = [json.dumps(plain).encode() + b"\n"] * 80 + [json.dumps(case).encode() + b"\n"]
    assert len(b"".join(rows[:-1])) > MB
    r = _upload(url, b"".join(rows), "tests.jsonl")
    assert r.status_code == 200 and r.json()["format"] == "test" and r.json()["n_examples"] == 81, r.text[:2000]


def test_the_estimate_reads_a_stored_file_a_line_at_a_time_and_counts_it_as_the_whole_file_did(tmp_path):
    from api.estimate import MAX_COUNTED_EXAMPLES, estimate_job, read_examples
    from citi_engine import DEFAULT_MODEL
    from citi_engine.specs import resolve_model_spec
    from citi_engine.training.config import FinetuneConfig
    from citi_service.storage import LocalStorage
    from tests.service.conftest import ROOT

    base = [json.loads(line) for line in (ROOT / "examples" / "tools_train.jsonl").read_text().splitlines() if line]
    examples = [base[i % len(base)] for i in range(5 * MAX_COUNTED_EXAMPLES + 7)]
    storage = LocalStorage(tmp_path)
    storage.put_bytes("files/big.jsonl", b"".join(json.dumps(e).encode() + b"\n\n" for e in examples))

    sample = read_examples(storage, "files/big.jsonl", len(examples))
    assert MAX_COUNTED_EXAMPLES <= len(sample) <= MAX_COUNTED_EXAMPLES + 5
    cfg = FinetuneConfig(model=DEFAULT_MODEL, training_file="t.jsonl", out_dir="out", method="citi")
    common = {"resolved": resolve_model_spec(DEFAULT_MODEL), "n_tool": len(examples), "n_general": 0,
              "has_validation_file": False, "device": "gpu", "gpu_memory_gb": 80.0}
    streamed = estimate_job(cfg, examples=sample, n_examples=len(examples), **common)
    whole = estimate_job(cfg, examples=examples, **common)
    assert streamed == whole
    assert streamed["examples"] == len(examples) and streamed["tokens"]["examples_counted"] == len(sample)
