"""POST /jobs/estimate's arithmetic, called directly (the route itself is covered in test_api.py):
several GPUs shorten the training, not the steps or the memory a GPU needs."""

from __future__ import annotations

import json

import pytest

from api.estimate import DDP_EFFICIENCY, estimate_job
from citi_engine import DEFAULT_MODEL
from citi_engine.specs import resolve_model_spec
from citi_engine.training.config import FinetuneConfig
from tests.service.conftest import ROOT


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    lines = (ROOT / "examples" / "tools_train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _estimate(examples, **kwargs) -> dict:
    cfg = FinetuneConfig(model=DEFAULT_MODEL, training_file="t.jsonl", out_dir="out", method="citi")
    resolved = resolve_model_spec(DEFAULT_MODEL)
    defaults = {"resolved": resolved, "examples": examples, "n_tool": len(examples), "n_general": 0,
                "has_validation_file": False, "device": "gpu", "gpu_memory_gb": 80.0}
    return estimate_job(cfg, **{**defaults, **kwargs})


def test_two_gpus_halve_the_training_time_and_keep_steps_and_memory(examples):
    unknown = _estimate(examples)
    one = _estimate(examples, gpus=1)
    two = _estimate(examples, gpus=2)
    assert unknown["gpus"] == one["gpus"] == 1 and two["gpus"] == 2
    assert any("CITI_GPUS_PER_JOB" in n for n in unknown["notes"])
    assert not any("CITI_GPUS_PER_JOB" in n for n in one["notes"] + two["notes"])
    assert two["steps"] == one["steps"] and two["memory"] == one["memory"]
    ratio = one["seconds_breakdown"]["training"] / two["seconds_breakdown"]["training"]
    assert ratio == pytest.approx(2 * DDP_EFFICIENCY, rel=0.01)
    # The parts that run on one process do not shrink.
    for part in ("load_model", "importance", "replay"):
        assert two["seconds_breakdown"][part] == one["seconds_breakdown"][part]
    assert two["estimated_seconds"] < one["estimated_seconds"]


def test_more_gpus_than_measured_say_so_and_cpu_ignores_gpus(examples):
    four = _estimate(examples, gpus=4)
    assert any("measured on 2" in n for n in four["notes"])
    cpu = _estimate(examples, device="cpu", gpus=4)
    assert cpu["gpus"] == 0
    assert cpu["seconds_breakdown"]["training"] == _estimate(examples, device="cpu")["seconds_breakdown"]["training"]


def test_the_api_reads_gpus_per_job_like_the_workers(monkeypatch):
    from pydantic import ValidationError

    from citi_service.settings import Settings

    monkeypatch.setenv("CITI_GPUS_PER_JOB", "")
    assert Settings().gpus_per_job is None  # empty: every GPU the worker sees; the estimate assumes one
    monkeypatch.setenv("CITI_GPUS_PER_JOB", "2")
    assert Settings().gpus_per_job == 2
    monkeypatch.setenv("CITI_GPUS_PER_JOB", "0")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Settings()
