"""Fixtures for the fault tests: a private redis-server with append-only persistence, and an API or
workers pointed at any Redis, on top of the service fixtures of ``tests/service/conftest.py``.

The private Redis runs with ``appendonly yes`` and ``appendfsync always``: every write is on disk before
Redis answers, so a ``kill -9`` of Redis loses nothing that a client was told had been stored. The shared
Redis on 6379 keeps nothing on disk, so restarting it is never tested there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.service.conftest import (  # noqa: F401  (fixtures re-exported for the tests of this directory)
    KEYS,
    ROOT,
    Worker,
    base_env,
    free_port,
    redis_db,
    service,
    start_uvicorn,
    stop_process,
    tiny_model,
    uploaded,
    workers,
)


class PrivateRedis:
    """A redis-server of our own on a free port, persisting every write (AOF, fsync always) under ``dir``."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def start(self) -> None:
        """Start (or start again, on the same port and data directory) and wait until it answers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 20
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """``kill -9``: no shutdown save, only what the append-only file already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop for good."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path / "redis-data")
    server.start()
    yield server
    server.stop()


def start_api_on(env: dict, log: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``uvicorn api.main:app`` on ``port`` (a free one when None; a restart reuses it); waits for /healthz."""
    return start_uvicorn("api.main:app", env, log, port=port)


def auth(who: str = "alice") -> dict:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def wait_terminal(url: str, job_id: str, timeout: float = 180, logs: tuple[Path, ...] = ()) -> dict:
    """Poll a job until it has ended (tolerating a moment where the API or Redis does not answer)."""
    deadline = time.time() + timeout
    job: dict = {}
    while time.time() < deadline:
        try:
            r = httpx.get(f"{url}/jobs/{job_id}", headers=auth(), timeout=10)
            if r.status_code == 200:
                job = r.json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.is_file())
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {job}\n{tails}")


def all_events(url: str, job_id: str) -> list[dict]:
    r = httpx.get(f"{url}/jobs/{job_id}/events", params={"limit": 1000}, headers=auth(), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def record_fault(name: str, **numbers: int) -> None:
    """Write a fault test's numbers where ``bench/reliability.py`` collects them (``CITI_RELIABILITY_OUT``)."""
    out = os.environ.get("CITI_RELIABILITY_OUT")
    if out:
        import json

        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(numbers))
