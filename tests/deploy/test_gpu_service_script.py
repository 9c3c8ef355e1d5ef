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


def latency_row(decode, model, clients, ttft, per_token):
    return {"decode": decode, "model": model, "clients": clients, "requests": clients, "ttft_p50_s": ttft,
            "ttft_p99_s": ttft * 2, "per_token_p50_s": per_token, "per_token_p99_s": per_token * 2}


def test_the_report_has_a_section_for_each_step_that_ran_and_says_what_was_met():
    gs = load()
    result = {
        "card": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "model": "smollm2.gguf", "started": "now",
        "latency": [latency_row(d, m, c, 0.05, 0.003) for d in ("dynamic", "cuda_graphs")
                    for c in (1, 16) for m in ("base", "adapter")],
        "kill": {"status": "succeeded", "killed": {"step": 12, "after": "ftckpt-x-step-00000012"},
                 "resumed_within_stage_two": False, "resumed_messages": ["resuming from checkpoint stage-1-start"],
                 "report_summary": {"tool_accuracy": 0.45}, "post_to_end_s": 300},
        "compare": {"service_train_s": 108.0, "quality_train_s": 100.0, "service_over_quality": 0.08,
                    "phases_counted": ["molora"]},
    }
    md = gs.render(result)
    assert "NVIDIA H100 80GB HBM3" in md and "abc1234" in md
    assert "## The main job" not in md and "## Two jobs queued" not in md  # steps that did not run
    rows = [line for line in md.splitlines() if line.startswith(("| dynamic |", "| cuda_graphs |"))]
    assert len(rows) == 8 and "| cuda_graphs | adapter | 16 | 16 | 50.0 | 100.0 | 3.0 | 6.0 |" in rows
    assert "resumed within stage 2: **no**" in md and "Tool accuracy 0.450" in md
    assert "adds +8.0% (target at most +5%: **missed**)" in md
    result["compare"]["service_over_quality"] = 0.03
    assert "**met**" in gs.render(result)
