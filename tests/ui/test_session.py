"""The dashboard's sign-in session: signed cookie, CSRF, sign-out, and the API's tenant rules through it.

The token functions are tested directly; everything else against the real API process.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from api.ui_session import Session, create_session, verify_session
from tests.service.conftest import KEYS, TINY_HYPERPARAMETERS, to_jsonl, training_lines

SECRET = b"0123456789abcdef0123456789abcdef"


# -- tokens ----------------------------------------------------------------------------------------


def test_a_token_verifies_until_it_expires_and_only_with_its_secret():
    token, session = create_session("alice", ttl_seconds=60, secret=SECRET, now=1000)
    assert verify_session(token, secret=SECRET, now=1059) == session
    assert session.tenant == "alice" and session.expires_at == 1060
    assert verify_session(token, secret=SECRET, now=1060) is None, "expired"
    assert verify_session(token, secret=b"another secret", now=1000) is None


def test_a_forged_or_garbled_token_is_refused():
    token, _ = create_session("alice", ttl_seconds=60, secret=SECRET, now=1000)
    body, mac = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["t"] = "bob"
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode() + "." + mac
    for bad in (forged, body, body + ".", "." + mac, "not.a.token", "", None, "x" * 5000, token[:-2] + "AA"):
        assert verify_session(bad, secret=SECRET, now=1000) is None, bad


def test_each_session_has_its_own_csrf_token():
    _, one = create_session("alice", secret=SECRET)
    _, two = create_session("alice", secret=SECRET)
    assert one.nonce != two.nonce
    assert one.csrf_token(SECRET) != two.csrf_token(SECRET)
    assert Session("alice", one.expires_at, one.nonce).csrf_token(SECRET) == one.csrf_token(SECRET)


# -- through the API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice_job(ui_service) -> str:
    """A job of alice's, cancelled at once (so no worker of another test picks it up)."""
    with ui_service.client("alice") as c:
        r = c.post("/v1/files", files={"file": ("train.jsonl", to_jsonl(training_lines()))})
        assert r.status_code == 200, r.text
        body = {"model": ui_service.model_dir, "training_file": r.json()["id"], "budget": {"max_steps": 3},
                "method": {"type": "citi", "hyperparameters": TINY_HYPERPARAMETERS}}
        r = c.post("/jobs", json=body)
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 200
    return job_id


@pytest.mark.service
def test_sign_in_sets_an_httponly_samesite_strict_cookie_that_authenticates(ui_service):
    with httpx.Client(base_url=ui_service.url, timeout=30) as c:
        r = c.post("/ui/session", json={"key": KEYS["alice"]})
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("citi_session=")
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/"} <= flags
        assert KEYS["alice"] not in cookie
        info = r.json()
        assert info["tenant"] == "alice" and info["csrf_header"] == "X-CSRF-Token" and info["csrf_token"]

        assert c.get("/ui/session").json() == info
        r = c.get("/jobs")
        assert r.status_code == 200 and r.json()["object"] == "list"
        assert c.get("/v1/models").status_code == 200


@pytest.mark.service
def test_a_wrong_key_gets_401_and_no_cookie(ui_service):
    with httpx.Client(base_url=ui_service.url, timeout=30) as c:
        r = c.post("/ui/session", json={"key": "sk-not-a-key"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert "set-cookie" not in r.headers
        assert c.get("/ui/session").status_code == 401
        assert c.get("/jobs").json()["error"]["code"] == "missing_api_key"
        r = c.post("/ui/session", content=b"key=" + KEYS["alice"].encode(),
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400, "a plain HTML form (which any site can post) cannot sign in"


@pytest.mark.service
def test_another_site_cannot_sign_a_visitor_in(ui_service):
    with httpx.Client(base_url=ui_service.url, timeout=30) as c:
        r = c.post("/ui/session", json={"key": KEYS["alice"]}, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request"
        assert "set-cookie" not in r.headers


@pytest.mark.service
def test_state_changing_requests_with_the_cookie_need_the_csrf_token(ui_service, alice_job):
    client, csrf = ui_service.sign_in("alice")
    r = client.post("/jobs/ftjob-doesnotexist/cancel")
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_token_invalid"
    r = client.post("/jobs/ftjob-doesnotexist/cancel", headers={"X-CSRF-Token": csrf[:-1] + "x"})
    assert r.status_code == 403
    _, other_csrf = ui_service.sign_in("alice")
    r = client.post("/jobs/ftjob-doesnotexist/cancel", headers={"X-CSRF-Token": other_csrf})
    assert r.status_code == 403, "a token of another session does not do"
    r = client.post("/jobs/ftjob-doesnotexist/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 404, "with the token the request is authenticated (and the job does not exist)"

    r = client.post("/v1/files", files={"file": ("t.jsonl", to_jsonl(training_lines()))},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    r = client.post("/jobs/estimate", json={"model": ui_service.model_dir, "training_file": r.json()["id"],
                                             "budget": {"max_steps": 3}}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    assert r.json()["steps"]["total"] == 3
    assert client.get(f"/jobs/{alice_job}").status_code == 200, "reads need no CSRF token"


@pytest.mark.service
def test_bearer_requests_are_judged_by_the_key_alone(ui_service):
    client, _ = ui_service.sign_in("alice")
    r = client.get("/jobs", headers={"Authorization": "Bearer sk-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/jobs/ftjob-doesnotexist/cancel", headers={"Authorization": f"Bearer {KEYS['alice']}"})
    assert r.status_code == 404, "a bearer request needs no CSRF token"


@pytest.mark.service
def test_a_forged_cookie_is_refused(ui_service):
    client, _ = ui_service.sign_in("alice")
    token = client.cookies["citi_session"]
    body, mac = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["t"] = "bob"
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode() + "." + mac
    with httpx.Client(base_url=ui_service.url, cookies={"citi_session": forged}, timeout=30) as c:
        assert c.get("/jobs").status_code == 401
        assert c.get("/ui/session").status_code == 401


@pytest.mark.service
def test_sessions_keep_the_tenant_rules(ui_service, alice_job):
    alice, _ = ui_service.sign_in("alice")
    bob, _ = ui_service.sign_in("bob")
    assert bob.get("/ui/session").json()["tenant"] == "bob"
    assert bob.get(f"/jobs/{alice_job}").status_code == 404
    assert bob.get(f"/jobs/{alice_job}/events").status_code == 404
    assert bob.get(f"/ui/api/jobs/{alice_job}/importance").status_code == 404
    assert alice_job not in [j["id"] for j in bob.get("/jobs").json()["data"]]
    r = alice.get(f"/ui/api/jobs/{alice_job}/importance")
    assert r.status_code == 409 and r.json()["error"]["code"] == "importance_not_available"
    assert alice_job in [j["id"] for j in alice.get("/jobs").json()["data"]]


@pytest.mark.service
def test_sign_out_revokes_the_session(ui_service):
    client, csrf = ui_service.sign_in("alice")
    token = client.cookies["citi_session"]
    assert client.delete("/ui/session").status_code == 403, "signing out needs the CSRF token too"
    r = client.delete("/ui/session", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 204
    assert 'citi_session=""' in r.headers["set-cookie"] or "max-age=0" in r.headers["set-cookie"].lower()
    with httpx.Client(base_url=ui_service.url, cookies={"citi_session": token}, timeout=30) as c:
        assert c.get("/jobs").status_code == 401, "the old token no longer works anywhere"
        assert c.get("/ui/session").status_code == 401


@pytest.mark.service
def test_pages_are_public_with_security_headers_and_data_is_not(ui_service):
    with httpx.Client(base_url=ui_service.url, timeout=30) as c:
        for path in ("/ui", "/ui/jobs", "/ui/jobs/ftjob-abc", "/ui/new", "/ui/chat"):
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff"
        r = c.get("/ui/assets/js/app.js")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
        assert c.get("/ui/assets/vendor/chart.umd.min.js").status_code == 200
        for path in ("/ui/assets/../ui_session.py", "/ui/assets/%2e%2e/ui_session.py", "/ui/assets/index.html",
                     "/ui/assets/vendor/README.md", "/ui/assets/js/nothing.js"):
            assert c.get(path).status_code == 404, path
        assert c.get("/ui/api/options").status_code == 401
        assert c.get("/ui/api/jobs/ftjob-abc/importance").status_code == 401


@pytest.mark.service
def test_form_options_come_from_the_engine_config(ui_service):
    from citi_engine.training.config import METHODS, ComponentsConfig

    with ui_service.client("alice") as c:
        options = c.get("/ui/api/options").json()
    assert options["methods"] == list(METHODS)
    components = {f["name"]: f for f in options["components"]}
    assert components["molora_fraction"]["default"] == ComponentsConfig().molora_fraction
    assert components["uco_fraction"]["help"]
    assert {f["name"] for f in options["budget"]} == {"max_steps", "max_tokens", "max_seconds"}
