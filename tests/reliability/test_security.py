"""Keys are never stored or logged in clear, and request bodies are limited in size."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.conftest import KEYS

pytestmark = pytest.mark.service

WRONG_KEY = "sk-wrong-key-that-nobody-has-42"


def test_keys_appear_neither_in_redis_nor_in_the_api_log(service, uploaded):
    for who in KEYS:
        with service.client(who) as c:
            assert c.get("/v1/files").status_code == 200
            assert c.get(f"/jobs/{'ftjob-' + '0' * 24}").status_code == 404
    r = httpx.get(service.url + "/jobs", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    assert r.status_code == 401 and WRONG_KEY not in r.text
    secrets = [*KEYS.values(), WRONG_KEY]
    r = service.redis
    for key in r.scan_iter("*"):
        kind = r.type(key)
        if kind == "string":
            values = [r.get(key)]
        elif kind == "hash":
            values = [*r.hkeys(key), *r.hvals(key)]
        elif kind in ("set", "zset", "list"):
            values = r.smembers(key) if kind == "set" else r.zrange(key, 0, -1) if kind == "zset" \
                else r.lrange(key, 0, -1)
        elif kind == "stream":
            values = [str(fields) for _, fields in r.xrange(key)]
        else:
            values = []
        blob = key + "".join(str(v) for v in values)
        assert not any(s in blob for s in secrets), f"a key in clear in Redis under {key}"
    log = service.log.read_text(errors="replace")
    assert not any(s in log for s in secrets), "a key in clear in the API log"


def test_a_json_body_over_the_request_limit_is_refused_with_413(service, uploaded):
    with service.client("alice") as c:
        body = service.job_body(uploaded, metadata={"pad": "x" * (2 * 1024 * 1024)})
        r = c.post("/jobs", json=body)
        assert r.status_code == 413, r.text[:300]
        assert r.json()["error"]["message"]
        assert c.get("/jobs", params={"limit": 100}).json()["data"] == [] or all(
            "pad" not in (j.get("metadata") or {}) for j in c.get("/jobs", params={"limit": 100}).json()["data"])
