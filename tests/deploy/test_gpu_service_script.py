"""bench/gpu_service.py's own arithmetic: the phases of a job as its event stream shows them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("gpu_service", ROOT / "bench" / "gpu_service.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def event(kind, at, stage=None, **data):
    return {"type": kind, "created_at": at, "received_at": at + 0.1,
            "data": {**({"type": kind} if kind in ("stage", "message") else {}), "stage": stage, **data}}


def test_phases_start_at_stage_events_not_at_messages_or_checkpoints_that_name_a_stage():
    # the shape a CITI job streams (H100 run): the plan names every training stage before the first starts
    events = [
        event("status", 0), event("stage", 16, "validating"), event("stage", 25, "loading"),
        event("stage", 43, "replay"), event("stage", 154, "importance"),
        event("message", 155, "router_pretraining"), event("message", 155, "molora"), event("message", 155, "uco"),
        event("stage", 155, "router_pretraining"), event("checkpoint", 156, "router_pretraining"),
        event("stage", 160, "molora"), event("checkpoint", 160, "molora"), event("stage", 243, "uco"),
        event("stage", 247, "saving"), event("stage", 248, "eval"), event("message", 300, "eval"),
    ]
    phases = load().phase_times(events, created_at=0.0, ended_at=380.0)
    assert phases == {"queued": 16, "validating": 9, "loading": 18, "replay": 111, "importance": 1,
                      "router_pretraining": 5, "molora": 83, "uco": 4, "saving": 1, "eval": 132}
    assert sum(phases.values()) == 380
