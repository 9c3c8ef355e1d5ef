"""Build function-disjoint train / validation / test files from the BFCL v4 data in the bfcl-eval wheel.

    python bench/build_bfcl_data.py [SOURCE] [--out .data/bfcl] [--test-fraction 0.25] [--val-fraction 0.1]

SOURCE is the bfcl-eval wheel (a zip), an unpacked ``bfcl_eval`` package or its ``data`` folder; by default
the newest ``/tmp/bfcl/*.whl``, else the installed ``bfcl_eval`` package (``pip install --no-deps bfcl-eval``).

Categories: simple_python, multiple, parallel, parallel_multiple, irrelevance. Examples that share a function
name are joined into one group (union-find); a group stays whole on one side, so no function name appears in
both the training data and the validation or test data. Groups are visited in a seeded hash order and put into
the test side, then the validation side, while each category stays within its share; the rest is training data.

Outputs under ``--out``:
- ``train.jsonl``: training format (``{"messages", "tools"}``), the target call(s) as an assistant turn. Each
  parameter takes its first accepted value; a parameter whose accepted values include "" (may be omitted) is
  left out. Irrelevance examples get a short plain answer saying that no available function fits.
- ``val.jsonl`` and ``test.jsonl``: tool test format (messages up to the last user turn, ``tools``,
  ``category``, ``ground_truth``; ``[]`` for irrelevance), plus the BFCL ``id``.
- ``live_irrelevance.jsonl``: ``--live-irrelevance`` requests of BFCL's live_irrelevance (real users' functions,
  none fits the request) in tool test format, for abstention on unseen tools.
- ``live_irrelevance_val.jsonl``: ``--live-irrelevance-val`` more of them, the next in the same order (no request
  in both files): the live set's validation side, on which settings for unseen tools are chosen, so the live test
  set stays unseen.
- ``split.json``: the counts per category and side, and the arguments used.

BFCL's schemas use Python-flavoured types; they are converted to JSON Schema (dict->object, float->number,
tuple->array, any->no type) so every file passes ``citi_engine.data.validate.validate_jsonl``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import sys
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
SIDES = ("train", "val", "test")
DEFAULT_WHEEL_GLOB = "/tmp/bfcl/*.whl"

_TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array"}
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# BFCL marks optional parameters with a non-standard keyword; "required" already says it in JSON Schema.
_DROPPED_KEYS = {"optional"}

_IRRELEVANT_ANSWERS = (
    "None of the functions available to me ({names}) can do this, so I can't help with this request using them.",
    "I can't do that with the tools I have: {names} don't fit this request.",
    "Sorry, no available function fits this request (I only have {names}).",
)


# ----------------------------------------------------------------------------------------------------------------
# Reading the data


def find_source(path: str | None) -> Path:
    """The wheel or folder to read: ``path`` if given, else the newest /tmp/bfcl wheel, else the installed package."""
    if path:
        source = Path(path)
        if not source.exists():
            raise SystemExit(f"BFCL source {path} does not exist; pass the bfcl-eval wheel or its bfcl_eval folder")
        return source
    wheels = sorted(glob.glob(DEFAULT_WHEEL_GLOB))
    if wheels:
        return Path(wheels[-1])
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise SystemExit(
        "no BFCL data found: run `pip download --no-deps bfcl-eval -d /tmp/bfcl` (or `pip install --no-deps "
        "bfcl-eval`), or pass the wheel's path"
    )


def data_reader(source: Path) -> Callable[[str], str | None]:
    """A function reading ``relpath`` (relative to ``bfcl_eval/data``) as text, or None when missing."""
    if source.is_file():
        archive = zipfile.ZipFile(source)
        names = set(archive.namelist())

        def read_zip(rel: str) -> str | None:
            name = f"bfcl_eval/data/{rel}"
            return archive.read(name).decode("utf-8") if name in names else None

        return read_zip
    root = next((d for d in (source / "bfcl_eval" / "data", source / "data", source) if (d / "possible_answer").is_dir()),
                None)
    if root is None:
        raise SystemExit(f"{source} holds no BFCL data folder (bfcl_eval/data with possible_answer/)")

    def read_dir(rel: str) -> str | None:
        file = root / rel
        return file.read_text(encoding="utf-8") if file.is_file() else None

    return read_dir


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_records(source: Path, categories: tuple[str, ...] = CATEGORIES) -> list[dict[str, Any]]:
    """BFCL examples as ``{"id", "category", "messages", "functions", "ground_truth"}``, in file order.

    ``ground_truth`` is BFCL's list of ``{name: {param: [accepted values]}}`` (``[]`` for irrelevance).
    """
    read = data_reader(source)
    records = []
    for category in categories:
        questions = read(f"BFCL_v4_{category}.json")
        if questions is None:
            raise SystemExit(f"{source} has no BFCL_v4_{category}.json; is it a bfcl-eval v4 release?")
        answers_text = read(f"possible_answer/BFCL_v4_{category}.json")
        answers = {a["id"]: a["ground_truth"] for a in _json_lines(answers_text)} if answers_text else {}
        for item in _json_lines(questions):
            if not category.endswith("irrelevance") and item["id"] not in answers:
                raise SystemExit(f"{item['id']} has no possible answer in the data; the release looks incomplete")
            records.append(
                {
                    "id": item["id"],
                    "category": category,
                    "messages": [m for turn in item["question"] for m in turn],
                    "functions": item["function"],
                    "ground_truth": answers.get(item["id"], []),
                }
            )
    return records


# ----------------------------------------------------------------------------------------------------------------
# Converting


def to_json_schema(schema: Any) -> Any:
    """A BFCL parameter schema as JSON Schema, recursively (properties, items, additionalProperties)."""
    if isinstance(schema, list):
        return [to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "type":
            kind = _TYPE_MAP.get(value, value)
            if kind == "any":
                continue
            if kind not in _JSON_TYPES:
                raise ValueError(f"BFCL schema type {value!r} has no JSON Schema equivalent in this script")
            out["type"] = kind
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    return out


def to_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BFCL function docs as OpenAI-shaped tools with JSON Schema parameters."""
    return [
        {
            "type": "function",
            "function": {
                "name": fn["name"],
                "description": fn.get("description", ""),
                "parameters": to_json_schema(fn.get("parameters", {"type": "dict", "properties": {}})),
            },
        }
        for fn in functions
    ]


def _call_id(record_id: str, index: int) -> str:
    return "call_" + hashlib.sha256(f"{record_id}:{index}".encode()).hexdigest()[:24]


def target_arguments(params: dict[str, list[Any]]) -> dict[str, Any]:
    """The arguments of a training target: each parameter's first accepted value; optional ones left out."""
    return {name: values[0] for name, values in params.items() if values and "" not in values}


def irrelevance_answer(record: dict[str, Any]) -> str:
    """Our short plain answer for an irrelevance case (the wording varies by a hash of the id)."""
    names = ", ".join(fn["name"] for fn in record["functions"])
    pick = int(hashlib.sha256(record["id"].encode()).hexdigest(), 16) % len(_IRRELEVANT_ANSWERS)
    return _IRRELEVANT_ANSWERS[pick].format(names=names)


def to_training_example(record: dict[str, Any]) -> dict[str, Any]:
    """The record in training format, its target as the final assistant turn."""
    if record["ground_truth"]:
        calls = []
        for i, call in enumerate(record["ground_truth"]):
            (name, params), = call.items()
            arguments = json.dumps(target_arguments(params), ensure_ascii=False)
            calls.append({"id": _call_id(record["id"], i), "type": "function",
                          "function": {"name": name, "arguments": arguments}})
        answer = {"role": "assistant", "content": None, "tool_calls": calls}
    else:
        answer = {"role": "assistant", "content": irrelevance_answer(record)}
    return {"messages": [*record["messages"], answer], "tools": to_tools(record["functions"])}


def to_test_example(record: dict[str, Any]) -> dict[str, Any]:
    """The record in tool test format."""
    return {
        "id": record["id"],
        "messages": record["messages"],
        "tools": to_tools(record["functions"]),
        "category": record["category"],
        "ground_truth": record["ground_truth"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Splitting


def function_groups(records: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of records grouped so that records sharing any function name share a group (union-find)."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for record in records:
        names = [fn["name"] for fn in record["functions"]]
        for name in names[1:]:
            parent[find(name)] = find(names[0])
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[find(record["functions"][0]["name"])].append(i)
    return list(groups.values())


def split_records(
    records: list[dict[str, Any]], *, test_fraction: float = 0.25, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Assign whole function groups to train / val / test, filling each category's test and val share.

    Each side's share per category is ``fraction * count`` (rounded). Groups come in the order of a seeded
    hash of their smallest function name, so the split is the same on every machine and Python version.
    """
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError("test and validation fractions must each be in [0, 1) and sum to less than 1")
    totals = Counter(r["category"] for r in records)
    targets = {
        "test": {c: round(test_fraction * n) for c, n in totals.items()},
        "val": {c: round(val_fraction * n) for c, n in totals.items()},
    }
    taken = {"test": Counter(), "val": Counter()}
    sides: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}

    def order(group: list[int]) -> str:
        smallest = min(fn["name"] for i in group for fn in records[i]["functions"])
        return hashlib.sha256(f"{seed}:{smallest}".encode()).hexdigest()

    for group in sorted(function_groups(records), key=order):
        counts = Counter(records[i]["category"] for i in group)
        side = "train"
        for candidate in ("test", "val"):
            if all(taken[candidate][c] + n <= targets[candidate][c] for c, n in counts.items()):
                side = candidate
                taken[candidate].update(counts)
                break
        sides[side].extend(records[i] for i in group)
    for side in SIDES:  # file order, not hash order, inside each side
        sides[side].sort(key=lambda r: (CATEGORIES.index(r["category"]), _id_number(r["id"])))
    return sides


def _id_number(record_id: str) -> int:
    tail = record_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def live_irrelevance_sample(source: Path, train_functions: set[str], n: int, seed: int,
                            skip: int = 0) -> list[dict[str, Any]]:
    """``n`` of BFCL's live_irrelevance requests (functions from real users; none fits the request), in a seeded
    hash order after the first ``skip``, leaving out any that offers a function the training data has. The test
    split's irrelevance cases come from the same curated set as the training data; these show abstention on
    unseen, messier tools."""
    if n <= 0:
        return []
    records = load_records(source, ("live_irrelevance",))
    records = [r for r in records if not function_names([r]) & train_functions]
    records.sort(key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    return records[skip:skip + n]


def function_names(records: list[dict[str, Any]]) -> set[str]:
    """Every function name the records define."""
    return {fn["name"] for r in records for fn in r["functions"]}


# ----------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help=f"bfcl-eval wheel or folder (default: {DEFAULT_WHEEL_GLOB}, "
                        "else the installed bfcl_eval package)")
    parser.add_argument("--out", default=".data/bfcl", help="output folder (default: .data/bfcl)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="share of each category for test")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each category for validation (0: no val.jsonl)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the group order")
    parser.add_argument("--live-irrelevance", type=int, default=200, metavar="N",
                        help="cases of BFCL's live_irrelevance (real users' functions, no call fits) written to "
                             "live_irrelevance.jsonl, a seeded sample without functions of the training data "
                             "(0: none)")
    parser.add_argument("--live-irrelevance-val", type=int, default=200, metavar="N",
                        help="the next N of the same order, written to live_irrelevance_val.jsonl: the live set's "
                             "validation side, for choosing settings (0: none)")
    args = parser.parse_args(argv)

    source = find_source(args.source)
    records = load_records(source)
    sides = split_records(records, test_fraction=args.test_fraction, val_fraction=args.val_fraction, seed=args.seed)
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        shared = function_names(sides[a]) & function_names(sides[b])
        assert not shared, f"function names in both {a} and {b}: {sorted(shared)[:5]}"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", [to_training_example(r) for r in sides["train"]])
    _write_jsonl(out / "test.jsonl", [to_test_example(r) for r in sides["test"]])
    if sides["val"]:
        _write_jsonl(out / "val.jsonl", [to_test_example(r) for r in sides["val"]])
    elif (out / "val.jsonl").exists():
        (out / "val.jsonl").unlink()  # a stale file from an earlier run would no longer be disjoint
    live = live_irrelevance_sample(source, function_names(sides["train"]), args.live_irrelevance, args.seed)
    if live:
        _write_jsonl(out / "live_irrelevance.jsonl", [to_test_example(r) for r in live])
    live_val = live_irrelevance_sample(source, function_names(sides["train"]), args.live_irrelevance_val, args.seed,
                                       skip=len(live))
    if live_val:
        _write_jsonl(out / "live_irrelevance_val.jsonl", [to_test_example(r) for r in live_val])
    counts = {side: dict(Counter(r["category"] for r in sides[side])) for side in SIDES}
    summary = {
        "source": source.name,
        "test_fraction": args.test_fraction,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "counts": counts,
        "n_functions": {side: len(function_names(sides[side])) for side in SIDES},
        "live_irrelevance": len(live),
        "live_irrelevance_val": len(live_val),
    }
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    print(f"BFCL data from {source} -> {out}")
    print(f"{'category':<20}" + "".join(f"{side:>8}" for side in SIDES))
    for category in CATEGORIES:
        print(f"{category:<20}" + "".join(f"{counts[side].get(category, 0):>8}" for side in SIDES))
    print(f"{'total':<20}" + "".join(f"{len(sides[side]):>8}" for side in SIDES))
    if live:
        print(f"live_irrelevance.jsonl: {len(live)} requests over real users' functions that none fits")
    if live_val:
        print(f"live_irrelevance_val.jsonl: {len(live_val)} more, for choosing settings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
