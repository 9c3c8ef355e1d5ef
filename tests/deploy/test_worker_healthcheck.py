"""docker/worker-healthcheck.py against a real Celery worker and a real (private) Redis."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "docker" / "worker-healthcheck.py"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def redis_env(tmp_path):
    """A private redis-server and the environment pointing the service at it."""
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITI_")}
    env.update(REDIS_URL=f"redis://127.0.0.1:{port}/0", CITI_ARTIFACT_DIR=str(tmp_path / "art"),
               CITI_LEASE_SECONDS="1", CITI_QUEUE="hc-test", PYTHONPATH=str(ROOT))
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield env
    proc.terminate()
    proc.wait(timeout=10)


def _check(env: dict, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), name], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def test_healthy_while_the_worker_beats_and_unhealthy_once_it_is_gone(redis_env, tmp_path):
    name = "worker@hc-test"
    before = _check(redis_env, name)
    assert before.returncode == 1 and "no heartbeat from worker@hc-test" in before.stdout

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-n", name, "--loglevel=INFO",
         "-Q", "hc-test", "--without-gossip", "--without-mingle"],
        env=redis_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        result = _check(redis_env, name)
        while result.returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            result = _check(redis_env, name)
        assert result.returncode == 0, result.stdout
        assert result.stdout.startswith(f"healthy: {name} heartbeat")
    finally:
        # kill -9: no clean shutdown, so the heartbeat stays in the store and must age out.
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    time.sleep(3 * 1 + 1)  # three leases of 1 s
    after = _check(redis_env, name)
    assert after.returncode == 1 and "old (limit 3 s)" in after.stdout


def test_unreachable_store_is_unhealthy_with_the_reason(redis_env):
    env = {**redis_env, "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"}
    result = _check(env, "worker@nowhere")
    assert result.returncode == 1 and "cannot read heartbeats" in result.stdout
