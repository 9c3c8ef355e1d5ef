#!/usr/bin/env python3
"""Health of a Celery worker container: its heartbeat in the job store is recent.

`celery inspect ping` cannot serve here: the solo pool answers control messages only between
tasks, so a worker busy with a job of several hours would look dead. The worker's reaper thread
writes a heartbeat every third of CITI_LEASE_SECONDS, job or no job; this check passes while the
heartbeat of ``worker@<this container's hostname>`` (the name docker-compose.yml gives the worker)
is younger than three leases.

Usage: citi-worker-healthcheck [WORKER_NAME]     exit status 0 healthy, 1 not
"""

from __future__ import annotations

import socket
import sys
import time


def main(argv: list[str]) -> int:
    """Check the heartbeat of the worker named in ``argv`` (default: worker@<hostname>)."""
    from citi_service.settings import get_settings
    from citi_service.store import Store

    name = argv[1] if len(argv) > 1 else f"worker@{socket.gethostname()}"
    settings = get_settings()
    try:
        beat = Store(settings.redis_url).workers().get(name)
    except Exception as exc:  # any failure to reach the store means unhealthy, with the reason
        print(f"unhealthy: cannot read heartbeats from {settings.redis_url}: {exc}")
        return 1
    if beat is None:
        print(f"unhealthy: no heartbeat from {name} yet")
        return 1
    age, limit = time.time() - float(beat["ts"]), 3 * settings.lease_seconds
    if age > limit:
        print(f"unhealthy: last heartbeat of {name} is {age:.0f} s old (limit {limit:.0f} s)")
        return 1
    print(f"healthy: {name} heartbeat {age:.0f} s ago, job {beat.get('job')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
