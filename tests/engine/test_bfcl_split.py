"""bench/build_bfcl_data.py on the real bfcl-eval wheel: function-disjoint, valid, every category present."""

from __future__ import annotations

import glob
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from citi_engine.data.validate import validate_jsonl

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "build_bfcl_data.py"
CATEGORIES = {"simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"}

pytestmark = pytest.mark.skipif(
    not glob.glob("/tmp/bfcl/*.whl") and importlib.util.find_spec("bfcl_eval") is None,
    reason="needs the bfcl-eval wheel: pip download --no-deps bfcl-eval -d /tmp/bfcl",
)


def load_script():
    spec = importlib.util.spec_from_file_location("build_bfcl_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def names(rows: list[dict]) -> set[str]:
    return {t["function"]["name"] for r in rows for t in r["tools"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bfcl")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_no_function_name_is_shared_between_train_val_and_test(built):
    out, _ = built
    train, val, test = (read_jsonl(out / f"{side}.jsonl") for side in ("train", "val", "test"))
    assert not names(train) & names(test)
    assert not names(train) & names(val)
    assert not names(val) & names(test)
    # ...and the calls themselves only use functions of their own side
    called = {c["function"]["name"] for r in train for m in r["messages"] for c in m.get("tool_calls") or []}
    assert called <= names(train) and not called & names(test)


def test_test_split_is_large_and_covers_every_category(built):
    out, stdout = built
    test = read_jsonl(out / "test.jsonl")
    val = read_jsonl(out / "val.jsonl")
    train = read_jsonl(out / "train.jsonl")
    assert len(test) >= 250
    assert set(Counter(r["category"] for r in test)) == CATEGORIES
    assert set(Counter(r["category"] for r in val)) == CATEGORIES
    assert len(train) + len(val) + len(test) == len(load_script().load_records(load_script().find_source(None)))
    irrelevant = [r for r in test if r["category"] == "irrelevance"]
    assert irrelevant and all(r["ground_truth"] == [] for r in irrelevant)
    assert all(r["ground_truth"] for r in test if r["category"] != "irrelevance")
    assert all(r["messages"][-1]["role"] == "user" for r in test)
    # the printed table and split.json agree with the files
    split = json.loads((out / "split.json").read_text())
    assert split["counts"]["test"] == dict(Counter(r["category"] for r in test))
    for category in CATEGORIES:
        assert category in stdout
    assert f"{len(train):>8}{len(val):>8}{len(test):>8}" in stdout


def test_every_output_line_passes_our_validator(built):
    out, _ = built
    train_report = validate_jsonl(out / "train.jsonl")
    assert train_report.ok, [str(p) for p in train_report.problems[:5]]
    for side in ("val", "test"):
        report = validate_jsonl(out / f"{side}.jsonl", purpose="test")
        assert report.ok, [str(p) for p in report.problems[:5]]


def test_training_targets_use_first_accepted_values_and_omit_optional_parameters(built):
    out, _ = built
    train = read_jsonl(out / "train.jsonl")
    # BFCL simple_python_1 (factorial of 5; train side of the default split) has only required parameters
    factorial = [r for r in train if r["messages"][0]["content"] == "Calculate the factorial of 5 using math functions."]
    assert len(factorial) == 1
    (target,) = factorial[0]["messages"][-1]["tool_calls"]
    assert json.loads(target["function"]["arguments"]) == {"number": 5}
    # no schema keeps a BFCL-only type, and no argument is an empty string (the "may be omitted" marker)
    text = (out / "train.jsonl").read_text()
    for bfcl_type in ('"type": "dict"', '"type": "float"', '"type": "tuple"', '"type": "any"'):
        assert bfcl_type not in text
    for row in train:
        for msg in row["messages"]:
            for c in msg.get("tool_calls") or []:
                assert "" not in json.loads(c["function"]["arguments"]).values()
    irrelevance = [r for r in train if not r["messages"][-1].get("tool_calls")]
    assert irrelevance and all(r["messages"][-1]["content"] for r in irrelevance)


def test_split_is_deterministic_and_follows_the_seed(tmp_path, built):
    out, _ = built
    again = tmp_path / "again"
    other = tmp_path / "other"
    for target, seed in ((again, "0"), (other, "1")):
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(target), "--seed", seed], cwd=ROOT, check=True,
                       capture_output=True, timeout=300)
    assert (again / "test.jsonl").read_bytes() == (out / "test.jsonl").read_bytes()
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert names(read_jsonl(other / "test.jsonl")) != names(read_jsonl(out / "test.jsonl"))
    assert not names(read_jsonl(other / "train.jsonl")) & names(read_jsonl(other / "test.jsonl"))


def test_schema_conversion_is_recursive():
    module = load_script()
    bfcl_schema = {
        "type": "dict",
        "properties": {
            "point": {"type": "tuple", "items": {"type": "float"}},
            "options": {"type": "dict", "properties": {"value": {"type": "any"}, "n": {"type": "integer"}},
                        "optional": True},
            "rows": {"type": "array", "items": {"type": "dict", "properties": {"w": {"type": "float"}}}},
        },
        "required": ["point"],
    }
    assert module.to_json_schema(bfcl_schema) == {
        "type": "object",
        "properties": {
            "point": {"type": "array", "items": {"type": "number"}},
            "options": {"type": "object", "properties": {"value": {}, "n": {"type": "integer"}}},
            "rows": {"type": "array", "items": {"type": "object", "properties": {"w": {"type": "number"}}}},
        },
        "required": ["point"],
    }
    assert module.target_arguments({"a": [1, 2], "b": ["", "x"], "c": [[3, 4]]}) == {"a": 1, "c": [3, 4]}


def test_live_irrelevance_set_offers_only_unseen_functions_and_loads_as_no_call_cases(built):
    from citi_engine.evaluate.tool_eval import load_tool_cases

    out, stdout = built
    live = read_jsonl(out / "live_irrelevance.jsonl")
    assert len(live) == 200 and "live_irrelevance.jsonl: 200" in stdout
    assert not names(live) & names(read_jsonl(out / "train.jsonl"))
    assert all(r["category"] == "live_irrelevance" and r["ground_truth"] == [] for r in live)
    cases = load_tool_cases(out / "live_irrelevance.jsonl")
    assert len(cases) == 200 and not any(c.expects_call for c in cases)
    assert json.loads((out / "split.json").read_text())["live_irrelevance"] == 200
    # the validation side: as many again, unseen functions too, and no request in both
    live_val = read_jsonl(out / "live_irrelevance_val.jsonl")
    assert len(live_val) == 200 and not names(live_val) & names(read_jsonl(out / "train.jsonl"))
    assert not {r["id"] for r in live} & {r["id"] for r in live_val}
