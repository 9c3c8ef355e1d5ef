"""scripts/demo.py's process handling: what `make demo` starts, it stops, also when a child resists.

The demo itself (a real job on SmolLM2, several minutes) is run by `make demo`, not here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_demo():
    spec = importlib.util.spec_from_file_location("citi_demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_stop_ends_a_service_and_the_children_it_started_even_one_ignoring_sigterm(tmp_path):
    services = demo.Services(tmp_path)
    pid_file = tmp_path / "child.pid"
    # The service starts a child that ignores SIGTERM, like a training process busy in native code.
    script = f"trap '' TERM; (trap '' TERM; echo $BASHPID > {pid_file}; sleep 60) & wait"
    proc = services.start("stubborn", ["bash", "-c", script], dict(os.environ))
    deadline = time.monotonic() + 5
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(proc.pid) and _alive(child)

    started = time.monotonic()
    services.stop(timeout=1.0)
    assert time.monotonic() - started < 5
    assert proc.poll() is not None
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert services.procs == []


def test_check_alive_reports_a_dead_service_with_its_log(tmp_path):
    services = demo.Services(tmp_path)
    services.start("broken", ["bash", "-c", "echo 'cannot bind port' >&2; exit 3"], dict(os.environ))
    time.sleep(0.5)
    with pytest.raises(demo.DemoError, match="broken exited with status 3:\ncannot bind port"):
        services.check_alive()
    services.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_private_redis_answers_on_its_own_port_and_is_gone_after_stop(tmp_path):
    services = demo.Services(tmp_path)
    port = demo.free_port()
    services.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], dict(os.environ))
    deadline = time.monotonic() + 10
    while not demo.redis_answers("127.0.0.1", port):
        assert time.monotonic() < deadline, services.tail("redis")
        time.sleep(0.05)
    services.stop()
    assert not demo.redis_answers("127.0.0.1", port)
