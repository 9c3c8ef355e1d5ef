"""The rule a default is chosen by on the validation side (bench/quality_merge.py --choose): a candidate must keep
tool accuracy and headline retention within their slack of the reference's, and then raise the goal metric."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import quality_merge  # noqa: E402


def _m(tool, headline, live):
    return {"tool_accuracy": tool, "headline_retention": headline, "live_irrelevance_accuracy": live}


def test_the_best_goal_among_candidates_that_keep_accuracy_and_retention_is_chosen():
    methods = {"ref": _m(0.47, 0.950, 0.60), "costly": _m(0.47, 0.930, 0.90), "worse_calls": _m(0.45, 0.950, 0.85),
               "good": _m(0.465, 0.945, 0.72), "better": _m(0.47, 0.948, 0.75)}
    choice = quality_merge.choose_setting(methods, "ref", ["costly", "worse_calls", "good", "better"],
                                          goal="live_irrelevance_accuracy")
    assert choice["chosen"] == "better"
    passed = {label: row["passed"] for label, row in choice["labels"].items()}
    assert passed == {"ref": True, "costly": False, "worse_calls": False, "good": True, "better": True}


def test_the_reference_stays_when_no_candidate_that_passes_beats_it():
    methods = {"ref": _m(0.47, 0.950, 0.60), "costly": _m(0.47, 0.900, 0.99), "same": _m(0.47, 0.950, 0.60)}
    choice = quality_merge.choose_setting(methods, "ref", ["costly", "same"], goal="live_irrelevance_accuracy")
    assert choice["chosen"] == "ref"
