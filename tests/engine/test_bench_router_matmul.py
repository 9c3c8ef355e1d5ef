"""bench/router_matmul.py on CPU: every layout of the router-and-A matmul gives the plain layout's outputs and gets
a time, and the kernel column stays empty off a GPU rather than made up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import router_matmul  # noqa: E402


def test_every_layout_computes_the_same_product_and_is_timed(tmp_path: Path) -> None:
    assert router_matmul.main(["--cpu", "--out", str(tmp_path), "--widths", "64,96", "--rows", "1,3",
                               "--calls", "2", "--rounds", "1"]) == 0
    doc = json.loads((tmp_path / "router_matmul.json").read_text())
    rows = doc["results"]
    assert {(r["width"], r["rows"]) for r in rows} == {(64, 1), (64, 3), (96, 1), (96, 3)}
    assert sorted({r["layout"] for r in rows}) == sorted(router_matmul.LAYOUTS)
    assert all(r["us_per_call"] > 0 and r["kernel"] == "" for r in rows)
    assert all(r["max_abs_diff_vs_linear"] < 1e-4 for r in rows)
    assert (tmp_path / "router_matmul.md").read_text().count("\n| ") == len(rows) + 1
