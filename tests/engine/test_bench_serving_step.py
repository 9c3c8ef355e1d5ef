"""bench/serving_step.py on CPU: every attention, model and row count gets its step timed, and the kernel tables
are written; the GPU-only columns (graph replay, host share) stay empty off a GPU rather than made up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import serving_step  # noqa: E402


def test_each_attention_model_and_row_count_is_timed_and_profiled(tmp_path: Path) -> None:
    assert serving_step.main(["--tiny", "--out", str(tmp_path), "--steps", "2", "--rounds", "1", "--rows", "1,3",
                              "--prompt", "16", "--profile"]) == 0
    doc = json.loads((tmp_path / "serving_step.json").read_text())
    assert doc["device"] == "cpu" and doc["kv_heads"] < doc["heads"]
    for attention in ("grouped", "sdpa"):
        for variant in ("base", "citi"):
            for rows in ("1", "3"):
                r = doc["results"][attention][variant][rows]
                assert r["step_ms"] > 0 and "replay_ms" not in r
                table = (tmp_path / f"serving_step_{attention}_{variant}_{rows}.txt").read_text()
                assert "aten::" in table
    md = (tmp_path / "serving_step.md").read_text()
    assert md.count("| n/a | n/a |") == 8


def test_the_benchmarks_adapter_carries_a_jobs_share_of_components_unless_told_otherwise(tmp_path: Path) -> None:
    import inference

    from citi_engine.components import fraction_to_count
    from citi_engine.training.config import ComponentsConfig

    names = [f"layers.{i}.{m}" for i in range(30) for m in ("q", "k", "v", "o", "gate", "up", "down")]
    molora, uco = inference.spread_components(names, 0.2, 0.1)
    assert molora == names[0::5] and len(uco) == 21 and not set(molora) & set(uco)  # the earlier layout
    molora, uco = inference.spread_components(names, 0.5, 0.1)
    assert len(molora) == 105 and len(uco) == 21 and not set(molora) & set(uco)
    assert {n.split(".")[1] for n in molora} == {str(i) for i in range(30)}  # spread over every layer

    assert serving_step.main(["--tiny", "--out", str(tmp_path), "--steps", "1", "--rounds", "1", "--rows", "1",
                              "--prompt", "8"]) == 0
    doc = json.loads((tmp_path / "serving_step.json").read_text())
    adapter, defaults = doc["adapter"], ComponentsConfig()
    assert adapter["molora_fraction"] == defaults.molora_fraction
    assert adapter["molora"] == fraction_to_count(defaults.molora_fraction, adapter["components"])
    assert adapter["uco"] == fraction_to_count(defaults.uco_fraction, adapter["components"])
