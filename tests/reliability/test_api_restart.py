"""The API is killed (``kill -9``) and started again while a client follows a running job's events:
the client reconnects with ``Last-Event-ID`` and ends up with every event exactly once, and the job,
its file and its events are all still there.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.reliability.conftest import (
    all_events,
    auth,
    record_fault,
    start_api_on,
    stop_process,
    wait_terminal,
)
from tests.service.conftest import TINY_HYPERPARAMETERS, free_port

pytestmark = pytest.mark.service


class SSEFollower(threading.Thread):
    """An SSE client that, like a browser's EventSource, reconnects with Last-Event-ID when cut off."""

    def __init__(self, url: str, job_id: str):
        super().__init__(daemon=True)
        self.url, self.job_id = url, job_id
        self.events: list[dict] = []
        self.reconnects = 0
        self.last_id: int | None = None
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.time() + 240
        try:
            while time.time() < deadline:
                headers = {**auth(), "Accept": "text/event-stream"}
                if self.last_id is not None:
                    headers["Last-Event-ID"] = str(self.last_id)
                try:
                    if self._follow(headers):
                        return
                except (httpx.HTTPError, ConnectionError):
                    pass
                self.reconnects += 1
                time.sleep(0.2)
            raise AssertionError("the stream never ended")
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        finally:
            self.done.set()

    def _follow(self, headers: dict) -> bool:
        """Read one connection; True when the server ended the stream (the job ended)."""
        current: dict = {}
        with httpx.stream("GET", f"{self.url}/jobs/{self.job_id}/events", headers=headers,
                          timeout=httpx.Timeout(10, read=30)) as r:
            if r.status_code != 200:
                return False
            for line in r.iter_lines():
                if line.startswith("id: "):
                    current["id"] = int(line[4:])
                elif line.startswith("data: "):
                    current["data"] = json.loads(line[6:])
                elif line == "" and "data" in current:
                    self.events.append(current["data"])
                    self.last_id = current["id"]
                    current = {}
        return True


def test_api_killed_mid_stream_loses_nothing_and_sse_resumes_with_last_event_id(service, workers, uploaded, tmp_path):
    port = free_port()
    log = tmp_path / "api.log"
    api, url = start_api_on(service.env, log, port)
    try:
        workers.start("wa")
        hyper = {**TINY_HYPERPARAMETERS, "eval_examples": 0}
        body = service.job_body(uploaded, budget={"max_steps": 12}, method={"type": "citi", "hyperparameters": hyper})
        job = httpx.post(f"{url}/jobs", headers=auth(), json=body, timeout=30).json()
        follower = SSEFollower(url, job["id"])
        follower.start()
        deadline = time.time() + 120
        while not any(e["type"] == "progress" and e["data"].get("stage") != "importance" for e in follower.events):
            assert time.time() < deadline and not follower.done.is_set(), (follower.error, service.tail_logs())
            time.sleep(0.05)
        seen_before = len(follower.events)
        os.killpg(api.pid, signal.SIGKILL)  # the API dies mid-stream; the job goes on in its worker
        api.wait(timeout=10)
        time.sleep(1.0)
        api, _ = start_api_on(service.env, log, port)

        assert follower.done.wait(240), "the follower did not finish"
        assert follower.error is None, follower.error
        assert follower.reconnects >= 1, "the stream was cut and resumed"
        done = wait_terminal(url, job["id"], timeout=60)
        assert done["status"] == "succeeded", done
        stored = all_events(url, job["id"])
        seqs = [e["seq"] for e in follower.events]
        assert seqs == [e["seq"] for e in stored] == list(range(1, len(stored) + 1)), "every event once, in order"
        assert follower.events == stored
        assert len(stored) > seen_before
        files = httpx.get(f"{url}/v1/files/{uploaded}", headers=auth()).json()
        assert files["id"] == uploaded
        events_lost = len({e["seq"] for e in stored} - set(seqs))
        record_fault("api_restart", jobs=1, lost=0 if done["status"] == "succeeded" else 1,
                     events_lost=events_lost, reconnects=follower.reconnects)
    finally:
        stop_process(api)
