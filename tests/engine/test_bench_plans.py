"""Every plan a GPU lease may run (bench/plans/*.txt) parses into runs with distinct result files, so a lease is not
spent finding a typo in its plan."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402

PLANS = sorted((ROOT / "bench" / "plans").glob("*.txt"))


@pytest.mark.parametrize("plan", PLANS, ids=[p.stem for p in PLANS])
def test_a_plan_parses_into_runs_with_their_own_result_files(plan, tmp_path):
    argv = ["--gguf", "model.gguf", "--out", str(tmp_path), "--split", "test", "--plan", str(plan)]
    runs = quality.planned_runs(argv, quality.build_parser().parse_args(argv))
    assert runs
    paths = [quality.result_path(line_args, run) for line_args, run in runs]
    assert len(set(paths)) == len(paths)


def test_the_next_plan_measures_the_shipped_near_miss_share_on_test():
    argv = ["--gguf", "model.gguf", "--out", "/tmp/x", "--split", "test", "--plan",
            str(ROOT / "bench" / "plans" / "method_next.txt")]
    runs = quality.planned_runs(argv, quality.build_parser().parse_args(argv))
    citi = [run for line_args, run in runs if line_args.method == "citi"]
    assert sorted(run["seed"] for run in citi) == [0, 1, 2]
