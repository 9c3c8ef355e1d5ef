"""Fixtures that run the real service: Redis on 127.0.0.1:6379 (one database per test session, flushed
only by us), ``uvicorn api.main:app`` and Celery workers as subprocesses, a tiny real model, artifacts
under pytest's tmp directory.

The database is claimed with a key in it (``citi-test:claim`` holding our pid), so parallel test sessions
never share or flush each other's database.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
CLAIM_KEY = "citi-test:claim"
KEYS = {"alice": "sk-alice-0123456789", "alice2": "sk-alice-second-key", "bob": "sk-bob-0123456789"}
MAX_UPLOAD = 200_000

pytestmark = pytest.mark.service


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_redis_db() -> int:
    """A Redis database number no other test session uses; ours until released."""
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2).ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_HOST}:{REDIS_PORT} (start redis-server)")
    me = str(os.getpid())
    for db in range(15, 0, -1):
        r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, decode_responses=True)
        holder = r.get(CLAIM_KEY)
        if holder is not None and holder.isdigit() and _pid_alive(int(holder)):
            continue
        if holder is None and r.dbsize() > 0:
            continue  # used by something that is not a test session: leave it alone
        if holder is not None:
            r.delete(CLAIM_KEY)  # a dead session's claim
        if r.set(CLAIM_KEY, me, nx=True):
            r.flushdb()
            r.set(CLAIM_KEY, me)
            return db
    pytest.skip("no free Redis database for this test session")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_lines(n_tool: int = 16, n_general: int = 8, seed: int = 0) -> list[dict]:
    """Small valid training data: weather tool calls and general arithmetic answers."""
    rnd = random.Random(seed)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    cities = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Tokyo", "Quito", "Delhi", "Accra", "Bern"]
    lines = []
    for i in range(n_tool):
        city = cities[i % len(cities)]
        lines.append({"messages": [
            {"role": "user", "content": f"What's the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}],
            "tools": tools})
    for _ in range(n_general):
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        lines.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                   {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return lines


def to_jsonl(lines: list) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


# Tiny jobs: every stage runs, in seconds on a 2-core CPU.
TINY_HYPERPARAMETERS = {"batch_size": 2, "importance_examples": 4, "eval_examples": 1, "eval_probes": 0,
                        "eval_humaneval": 0, "max_length": 512}


@dataclass
class Service:
    """A running API server and what the tests need to talk to it."""

    url: str
    db: int
    env: dict
    artifact_dir: Path
    model_dir: str
    log: Path
    proc: subprocess.Popen | None = None
    workers: list = field(default_factory=list)

    def client(self, who: str = "alice", **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.db, decode_responses=True)

    def job_body(self, training_file: str, **overrides) -> dict:
        body = {"model": self.model_dir, "training_file": training_file,
                "method": {"type": "citi", "hyperparameters": dict(TINY_HYPERPARAMETERS)},
                "budget": {"max_steps": 3}, "seed": 1}
        body.update(overrides)
        return body

    def wait_status(self, job_id: str, statuses: tuple[str, ...], *, who: str = "alice", timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        with self.client(who) as c:
            while True:
                job = c.get(f"/jobs/{job_id}").json()
                if job["status"] in statuses:
                    return job
                if time.time() > deadline:
                    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: "
                                         f"{json.dumps(job)[:2000]}\n{self.tail_logs()}")
                time.sleep(0.3)

    def tail_logs(self) -> str:
        out = []
        for path in [self.log, *[w.log for w in self.workers]]:
            if path.is_file():
                out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(out)


@dataclass
class Worker:
    """A Celery worker subprocess (its own process group, so stopping it stops its job's child too)."""

    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left (a job's child)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


def base_env(db: int, artifact_dir: Path, model_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITI_", "AWS_"))}
    env.update({
        "REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}",
        "CITI_ARTIFACT_DIR": str(artifact_dir),
        "CITI_API_KEYS": ",".join(f"{'alice' if who.startswith('alice') else who}:{key}" for who, key in KEYS.items()),
        "CITI_MODEL_DIRS": str(model_root),
        "CITI_LEASE_SECONDS": "5",
        "CITI_DEVICE": "cpu",
        "CITI_STORAGE": "local",
        "CITI_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "CITI_MAX_ACTIVE_JOBS_PER_TENANT": "6",
        # Tests present wrong keys on purpose, many a minute from one address; the throttle has its own test.
        "CITI_AUTH_FAILURES_PER_MINUTE": "100000",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def start_uvicorn(app: str, env: dict, log: Path, *, port: int | None = None, name: str = "the API",
                  timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``uvicorn <app>`` on ``port`` (a free one when None), in its own process group; returns once /healthz answers."""
    port = port or free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"{name} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def start_api(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """The API on a free port, once it answers."""
    return start_uvicorn("api.main:app", env, log)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def start_worker(env: dict, name: str, log: Path) -> Worker:
    """A Celery worker on ``env``'s Redis (``REDIS_URL``); ready once its reaper has written its first heartbeat."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-n", f"{name}@test",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker = Worker(name, proc, log)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if r.hexists("citi:workers", f"{name}@test"):  # the reaper's first heartbeat: the worker is ready
            return worker
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"worker {name} did not start within 60 s:\n{log.read_text()[-3000:]}")


# -- fixtures --------------------------------------------------------------------------------------


def release_redis_db(db: int) -> None:
    """Flush a database this session claimed (and only then)."""
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, decode_responses=True)
    if r.get(CLAIM_KEY) == str(os.getpid()):
        r.flushdb()


@pytest.fixture(scope="session")
def redis_db():
    db = claim_redis_db()
    yield db
    release_redis_db(db)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Llama directory under the configured model root."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from citi_engine.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("models")
    return make_tiny_model_dir(root / "tiny-llama")


@pytest.fixture(scope="session")
def service(tmp_path_factory, redis_db, tiny_model):
    """The API server (local storage), shared by the session; workers are started per test."""
    base = tmp_path_factory.mktemp("service")
    env = base_env(redis_db, base / "artifacts", Path(tiny_model).parent)
    log = base / "api.log"
    proc, url = start_api(env, log)
    svc = Service(url=url, db=redis_db, env=env, artifact_dir=base / "artifacts", model_dir=tiny_model, log=log,
                  proc=proc)
    yield svc
    stop_process(proc)


@pytest.fixture
def workers(service, tmp_path):
    """Start workers with ``workers.start(name)``; all are stopped after the test."""

    class _Workers:
        def start(self, name: str, **extra_env: str) -> Worker:
            env = {**service.env, **extra_env}
            worker = start_worker(env, name, tmp_path / f"{name}.log")
            service.workers.append(worker)
            return worker

    yield _Workers()
    for worker in service.workers:
        worker.stop()
    service.workers.clear()


@pytest.fixture(scope="session")
def uploaded(service) -> str:
    """The id of a valid training file uploaded by alice."""
    with service.client("alice") as c:
        r = c.post("/v1/files", files={"file": ("train.jsonl", to_jsonl(training_lines()))},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """moto's standalone S3-compatible server on a free port; yields its endpoint URL."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        pytest.skip("moto[server] is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(url + "/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    yield url
    stop_process(proc)


S3_CREDENTIALS = {"CITI_S3_ACCESS_KEY_ID": "testing", "CITI_S3_SECRET_ACCESS_KEY": "testing",
                  "CITI_S3_REGION": "us-east-1"}


def s3_storage(endpoint: str, bucket: str, prefix: str = ""):
    from citi_service.storage import S3Storage

    return S3Storage(bucket, prefix=prefix, endpoint_url=endpoint, region="us-east-1", access_key_id="testing",
                     secret_access_key="testing", create_bucket=True)
