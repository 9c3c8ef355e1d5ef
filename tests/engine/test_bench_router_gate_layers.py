"""bench/router_gate_layers.py splits a run's backbone gates by depth the way its table says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import router_gate_layers  # noqa: E402


def _record():
    # six layers, one component each: thirds are layers 0-1, 2-3, 4-5
    general = {f"model.layers.{i}.mlp.down_proj": g for i, g in enumerate([0.2, 0.4, 0.5, 0.7, 0.8, 0.9])}
    tool = {name: 0.1 for name in general}
    router = {kind: {"mean": sum(v.values()) / len(v), "per_layer": v}
              for kind, v in (("general", general), ("general_with_tools", general), ("tool_call", tool))}
    return {"run_id": "val_x_s0", "router": router}


def test_gates_are_averaged_by_depth_third_and_components_at_the_target_counted(tmp_path, capsys):
    row = router_gate_layers.summarise(_record())
    assert row["general"]["by_depth"] == pytest.approx([0.3, 0.6, 0.85])
    assert row["tool_call"]["by_depth"] == pytest.approx([0.1, 0.1, 0.1])
    assert row["general_at_0.8"] == pytest.approx(2 / 6)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_record()))
    assert router_gate_layers.main([str(path)]) == 0
    assert "| val_x_s0 | 0.30 / 0.60 / 0.85 |" in capsys.readouterr().out


def test_a_component_without_a_layer_index_is_refused_by_name():
    with pytest.raises(ValueError, match="lm_head"):
        router_gate_layers.depth_of("lm_head")
