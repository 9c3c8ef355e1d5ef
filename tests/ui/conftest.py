"""Fixtures for the dashboard tests: the real service (uvicorn ``api.main:app``, a Celery worker and the
inference server as subprocesses, Redis, a tiny real model) and headless Chromium driven by Playwright.

The service helpers (Redis database claim, process start and stop, sample data) are the service tests'
own, imported from ``tests/service/conftest.py`` so both suites start the service the same way.
Chromium is Debian's package (``apt-get install -y chromium``), never a browser Playwright downloads;
without it the browser tests are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.service.conftest import (
    KEYS,
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    base_env,
    claim_redis_db,
    free_port,
    start_api,
    start_uvicorn,
    start_worker,
    stop_process,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "bench" / "results" / "ui"


@dataclass
class UIService:
    """The running API (with the dashboard), what it was started with, and lazily started helpers."""

    url: str
    db: int
    env: dict
    model_dir: str
    base: Path
    inference_url: str
    api_proc: subprocess.Popen
    procs: list = field(default_factory=list)
    workers: list = field(default_factory=list)
    clients: list = field(default_factory=list)

    def client(self, who: str | None = "alice", **kwargs) -> httpx.Client:
        """An API client with ``who``'s bearer key (None: no key)."""
        headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(300, connect=10), **kwargs)

    def sign_in(self, who: str = "alice") -> tuple[httpx.Client, str]:
        """A client holding ``who``'s dashboard session cookie (no bearer key), and the session's CSRF token.
        The client is closed when the service stops."""
        client = httpx.Client(base_url=self.url, timeout=60)
        self.clients.append(client)
        r = client.post("/ui/session", json={"key": KEYS[who]})
        assert r.status_code == 200, r.text
        return client, r.json()["csrf_token"]

    def tail_logs(self) -> str:
        out = []
        for path in sorted(self.base.glob("*.log")):
            out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(out)


def _start_inference(env: dict, port: int, log: Path) -> subprocess.Popen:
    return start_uvicorn("worker.inference.app:app", env, log, port=port, name="the inference server", timeout=120)[0]


@pytest.fixture(scope="session")
def ui_redis_db():
    db = claim_redis_db()
    yield db
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, decode_responses=True)
    if r.get("citi-test:claim") == str(os.getpid()):
        r.flushdb()


@pytest.fixture(scope="session")
def ui_service(tmp_path_factory, ui_redis_db) -> UIService:
    """The API with the dashboard; the worker and the inference server start when a test asks for them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from citi_engine.testing import make_tiny_model_dir

    base = tmp_path_factory.mktemp("ui-service")
    model_dir = make_tiny_model_dir(base / "models" / "tiny-llama")
    inference_port = free_port()
    env = base_env(ui_redis_db, base / "artifacts", Path(model_dir).parent)
    env.update({"CITI_INFERENCE_URL": f"http://127.0.0.1:{inference_port}", "CITI_INFERENCE_DEVICE": "cpu",
                "CITI_INFERENCE_CACHE_DIR": str(base / "inference-cache"),
                "CITI_SESSION_SECRET": "ui-test-session-secret", "CITI_INFERENCE_TOKEN": "ui-test-inference-token"})
    proc, url = start_api(env, base / "api.log")
    if httpx.get(url + "/ui", timeout=10).status_code != 200:
        stop_process(proc)
        pytest.fail("the API does not serve the dashboard: api/main.py must include api.routers.ui.router and call "
                    "api.deps.set_session_resolver(api.ui_session.resolve_session)")
    svc = UIService(url=url, db=ui_redis_db, env=env, model_dir=model_dir, base=base,
                    inference_url=env["CITI_INFERENCE_URL"], api_proc=proc)
    yield svc
    for client in svc.clients:
        client.close()
    for worker in svc.workers:
        worker.stop()
    for p in svc.procs:
        stop_process(p)
    stop_process(proc)


@pytest.fixture(scope="session")
def ui_worker(ui_service):
    """One Celery worker for the session."""
    worker = start_worker(ui_service.env, "ui1", ui_service.base / "worker-ui1.log")
    ui_service.workers.append(worker)
    return worker


@pytest.fixture(scope="session")
def ui_inference(ui_service):
    """The inference server the API forwards chat requests to."""
    port = int(ui_service.inference_url.rsplit(":", 1)[1])
    ui_service.procs.append(_start_inference(ui_service.env, port, ui_service.base / "inference.log"))
    return ui_service.inference_url


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium (skipped, saying why, when it is not installed).

    Module-scoped: Playwright's sync API keeps an asyncio loop running in this thread while it is open, which
    would break later tests that call asyncio.run().
    """
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}: the dashboard's browser tests need Debian's "
                    "'chromium' package (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def page(browser, ui_service, request, tmp_path):
    """A fresh browser tab on the service; its script errors and CSP refusals are collected in ``page.problems``."""
    context = browser.new_context(base_url=ui_service.url, accept_downloads=True,
                                  viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    problems: list[str] = []

    def on_console(msg) -> None:
        # Chromium logs every 4xx answer as "Failed to load resource"; the pages expect some (sign-in check,
        # refused uploads). Script errors and CSP refusals are what must not happen.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            problems.append(f"console error: {msg.text}")

    tab.on("console", on_console)
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    tab.problems = problems
    yield tab
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        shot = tmp_path / "failure.png"
        tab.screenshot(path=shot, full_page=True)
        print(f"page at failure: {tab.url}, screenshot {shot}\nbrowser problems: {problems}\n"
              f"{ui_service.tail_logs()}")
    context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Where page screenshots are saved (committed, and shown in the README)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
