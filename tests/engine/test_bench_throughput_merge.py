"""bench/throughput_merge.py: the layer micro-benchmark's target per kind of projection, and every run kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import throughput_merge  # noqa: E402


def _micro(lora_k: float) -> dict:
    def row(module: str, count: int, lora: float, molora: float) -> dict:
        return {"module": module, "in": 8, "out": 8, "count": count, "base_ms": 0.1, "lora_ms": lora,
                "molora_ms": molora}

    rows = [row("q_proj", 2, 1.0, 1.0), row("k_proj", 1, lora_k, 2.0), row("up_proj", 3, 2.0, 1.5)]
    total = {"base": 0.6, "lora": sum(r["count"] * r["lora_ms"] for r in rows),
             "molora": sum(r["count"] * r["molora_ms"] for r in rows)}
    return {"kind": "micro_molora", "shape": "8b", "card": "GPU X", "tokens": 4096, "num_experts": 4, "rank": 8,
            "lora_rank": 32, "rounds": 7, "iters_per_round": 30, "rows": rows, "total_ms": total,
            "ratio_molora_vs_lora": total["molora"] / total["lora"], "overhead_ratio": 1.0, "commit": "abc"}


def test_attention_and_mlp_get_their_own_target_lines_weighted_by_count() -> None:
    rows = _micro(lora_k=1.0)["rows"]
    assert throughput_merge.group_ratio(rows, ("q_proj", "k_proj", "v_proj", "o_proj"), "molora", "lora") \
        == pytest.approx((2 * 1.0 + 2.0) / (2 * 1.0 + 1.0))
    assert throughput_merge.group_ratio(rows, ("gate_proj", "up_proj"), "molora", "lora") == pytest.approx(0.75)
    assert throughput_merge.group_ratio(rows, ("gate_proj",), "molora", "lora") is None
    lines = throughput_merge.targets([], [_micro(lora_k=1.0)], [])
    attention = next(line for line in lines if "attention projections |" in line)
    assert "1.333" in attention and "NOT met" in attention
    assert "| met |" in next(line for line in lines if "MLP projections |" in line)
    assert not any("MFU" in line for line in lines)  # micro-benchmarks alone: no training runs to judge


def test_runs_of_one_kind_from_several_folders_all_reach_the_raw_folder(tmp_path: Path) -> None:
    for name, lora_k in (("eager", 1.0), ("repeat", 1.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "8b_micro_molora.json").write_text(json.dumps(_micro(lora_k)))
    out = tmp_path / "results"
    assert throughput_merge.main([str(tmp_path / "eager"), str(tmp_path / "repeat"), "--results", str(out)]) == 0
    raw = sorted(p.name for p in (out / "throughput_raw").iterdir())
    assert raw == ["8b_micro_molora.json", "repeat_8b_micro_molora.json"]
    doc = json.loads((out / "throughput.json").read_text())
    assert [m["rows"][1]["lora_ms"] for m in doc["micro_molora"]] == [1.0, 1.5]
    assert (out / "throughput.md").read_text().count("## Fused MOLoRA vs plain LoRA") == 2
