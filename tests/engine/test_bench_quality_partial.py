"""bench/quality.py keeps what a run has measured while it runs (a GPU lease may end mid-run), and nothing that
reads results mistakes that partial record for a finished run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
import quality_merge  # noqa: E402


def _args(tmp_path):
    return quality.build_parser().parse_args(["--gguf", "model.gguf", "--method", "citi", "--out", str(tmp_path)])


def _record(run_id, **extra):
    return {"run_id": run_id, "label": "citi", "method": "citi", "seed": 0, "tool_accuracy": 0.5,
            "per_example": [{"correct": True}], **extra}


def test_a_partial_record_is_kept_beside_the_results_and_the_merge_does_not_read_it(tmp_path):
    args = _args(tmp_path)
    run = quality.expand(args)[0]
    quality.save_partial(args, run, _record(run["run_id"], train_seconds=12.0))
    kept = quality.partial_path(args, run)
    assert kept.parent == tmp_path and kept.name.startswith(run["run_id"])
    saved = json.loads(kept.read_text())
    assert saved["partial"] is True and saved["train_seconds"] == 12.0
    assert not quality.result_path(args, run).exists()
    assert quality_merge.load_runs([str(tmp_path)]) == []
    assert not list(tmp_path.glob("*.tmp"))


def test_finishing_a_run_writes_its_result_and_removes_its_partial_record(tmp_path):
    args = _args(tmp_path)
    run = quality.expand(args)[0]
    quality.save_partial(args, run, _record(run["run_id"]))
    quality.finish(args, run, _record(run["run_id"], headline_retention=0.9))
    assert not quality.partial_path(args, run).exists()
    runs = quality_merge.load_runs([str(tmp_path)])
    assert [r["headline_retention"] for r in runs] == [0.9] and "partial" not in runs[0]
