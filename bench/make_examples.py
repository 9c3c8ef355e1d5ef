"""Build the small sample files in examples/ reproducibly.

    python bench/make_examples.py [BFCL_SOURCE] [--out examples] [--skip-general]

- ``tools_train.jsonl``: tool examples sampled from the BFCL training split (see build_bfcl_data.py), mixed
  categories, plus a few with a tool-result turn and a final answer (the results are worked out here).
- ``general.jsonl``: general prompts from the replay pool (never the probe pool), answered greedily by the
  base model ``smollm2-135m-instruct`` on CPU. An answer cut off by the token limit is trimmed back to its
  last full sentence. ``--skip-general`` keeps the existing file (no model load).
- ``tools_test.jsonl``: a few BFCL test-split lines in our tool test format.
- ``tools.json``: tools for a chat demo. ``bad_example.jsonl``: a file showing the validator's error codes.

At the end every file is validated: tools_train + general together must pass as training data, tools_test as
test data, and bad_example must fail with the codes it is meant to show.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from citi_engine.data.prompts import PROBE_PROMPTS, PROMPT_KINDS, REPLAY_PROMPTS  # noqa: E402
from citi_engine.data.validate import validate_jsonl  # noqa: E402


def _load_bfcl_module():
    spec = importlib.util.spec_from_file_location("build_bfcl_data", Path(__file__).with_name("build_bfcl_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bfcl = _load_bfcl_module()

TOOL_SAMPLES = {"simple_python": 8, "multiple": 5, "parallel": 6, "parallel_multiple": 5, "irrelevance": 6}
TEST_SAMPLES = 4  # per category
GENERAL_PER_KIND = 2
MAX_NEW_TOKENS = 120

# Training records that get a tool-result turn and a final answer; the results are computed by hand.
WITH_RESULTS = {
    "simple_python_1": ('{"result": 120}', "The factorial of 5 is 120."),
    "simple_python_24": ('{"gcd": 6}', "The greatest common divisor of 12 and 18 is 6."),
    "simple_python_104": ('{"area": 30}', "The triangle's area is 30 square units (half of 6 times 10)."),
}

DEMO_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. 'Paris'."},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit."},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "currency.convert",
            "description": "Convert an amount of money from one currency to another at today's rate.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "description": "The amount to convert."},
                    "from_currency": {"type": "string", "description": "ISO code of the source currency, e.g. 'EUR'."},
                    "to_currency": {"type": "string", "description": "ISO code of the target currency, e.g. 'USD'."},
                },
                "required": ["amount", "from_currency", "to_currency"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calendar.create_event",
            "description": "Add an event to the user's calendar.",
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "description": "Short title of the event."},
                    "date": {"type": "string", "description": "Date as YYYY-MM-DD."},
                    "time": {"type": "string", "description": "Start time as HH:MM (24-hour clock)."},
                    "duration_minutes": {"type": "integer", "description": "Length of the event in minutes."},
                },
                "required": ["title", "date"],
            },
        },
    },
]

_USER = {"role": "user", "content": "What's the weather in Oslo?"}
_WEATHER_TOOL = DEMO_TOOLS[0]
# One line per problem the validator reports (each comment names the code the line shows).
BAD_LINES: list[tuple[str, str]] = [
    ("invalid_json", '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}'),
    ("not_an_object", '["user", "Hi", "assistant", "Hello"]'),
    ("missing_messages", json.dumps({"prompt": "Hi", "completion": "Hello"})),
    ("unknown_role", json.dumps({"messages": [{"role": "human", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]})),
    ("empty_assistant_turn", json.dumps({"messages": [_USER, {"role": "assistant", "content": ""}],
                                         "tools": [_WEATHER_TOOL]})),
    ("invalid_arguments_json", json.dumps({"messages": [_USER, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_current_weather", "arguments": "{city: Oslo}"}}]}],
        "tools": [_WEATHER_TOOL]})),
    ("unknown_function", json.dumps({"messages": [_USER, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}],
        "tools": [_WEATHER_TOOL]})),
    ("invalid_tool_schema", json.dumps({"messages": [_USER, {"role": "assistant", "content": "It is sunny."}],
                                        "tools": [{"type": "function", "function": {
                                            "name": "get_current_weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "text"}}}}}]})),
    ("no_trainable_turn", json.dumps({"messages": [_USER, {"role": "assistant", "content": "It is sunny.",
                                                           "weight": 0}]})),
    ("invalid_field", json.dumps({"messages": [{"role": "user", "content": ["What's", "the", "weather?"]},
                                               {"role": "assistant", "content": "Where?"}]})),
]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _short_first(records: list[dict[str, Any]], category: str, convert) -> list[dict[str, Any]]:
    """Records of a category in hash order, keeping the shorter half so the sample files stay small."""
    pool = [r for r in records if r["category"] == category]
    sizes = sorted(len(json.dumps(convert(r))) for r in pool)
    limit = sizes[len(sizes) // 2]
    return sorted((r for r in pool if len(json.dumps(convert(r))) <= limit), key=lambda r: _hash(r["id"]))


def tool_train_examples(train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A mixed sample of training examples, plus the ones with a tool result and a final answer."""
    by_id = {r["id"]: r for r in train}
    missing = [rid for rid in WITH_RESULTS if rid not in by_id]
    if missing:
        raise SystemExit(f"{missing} are no longer in the training split; pick other records for WITH_RESULTS")
    examples = []
    for category, n in TOOL_SAMPLES.items():
        picked = [r for r in _short_first(train, category, bfcl.to_training_example) if r["id"] not in WITH_RESULTS]
        examples += [bfcl.to_training_example(r) for r in picked[:n]]
    for rid, (result, answer) in WITH_RESULTS.items():
        example = bfcl.to_training_example(by_id[rid])
        call = example["messages"][-1]["tool_calls"][0]
        example["messages"] += [
            {"role": "tool", "tool_call_id": call["id"], "content": result},
            {"role": "assistant", "content": answer},
        ]
        examples.append(example)
    return examples


def tool_test_examples(test: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A few test-split lines of each category, in tool test format."""
    lines = []
    for category in bfcl.CATEGORIES:
        lines += [bfcl.to_test_example(r) for r in _short_first(test, category, bfcl.to_test_example)[:TEST_SAMPLES]]
    return lines


def general_prompts() -> list[str]:
    """Two replay prompts of each kind (never probe prompts)."""
    per_kind = len(REPLAY_PROMPTS) // len(PROMPT_KINDS)
    chosen = [REPLAY_PROMPTS[k * per_kind + j] for k in range(len(PROMPT_KINDS)) for j in (0, per_kind // 2)]
    assert not set(chosen) & set(PROBE_PROMPTS), "general examples must not use probe prompts"
    return chosen[: GENERAL_PER_KIND * len(PROMPT_KINDS)]


def _trim_to_sentence(text: str) -> str:
    """Cut an unfinished answer back to its last sentence or line end, if that keeps most of it."""
    # A sentence ends at . ! ? after a non-digit (so "2." of a list does not count), a line at a newline.
    ends = [m.end() for m in re.finditer(r"[^\d\s][.!?](?=\s)|\S(?=\n)", text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[: ends[-1]]
    return text.rstrip()


def general_examples(prompts: list[str]) -> list[dict[str, Any]]:
    """The base model's greedy answers to ``prompts``, as general training examples."""
    import torch

    from citi_engine import DEFAULT_MODEL
    from citi_engine.data.chat_format import render_prompt
    from citi_engine.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    tokenizer.padding_side = "left"  # generation continues every prompt from its end
    texts = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    examples = []
    for prompt, row in zip(prompts, out[:, batch["input_ids"].shape[1]:], strict=True):
        ids = row.tolist()
        finished = tokenizer.eos_token_id in ids
        if finished:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if not finished:
            answer = _trim_to_sentence(answer)
        examples.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return examples


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def check(out: Path) -> None:
    """Validate the written files; exit with the problems when one is not as intended."""
    combined = (out / "tools_train.jsonl").read_bytes() + (out / "general.jsonl").read_bytes()
    report = validate_jsonl(combined)
    if not report.ok:
        raise SystemExit("examples do not validate:\n" + "\n".join(map(str, report.problems)))
    print(f"tools_train + general: ok ({report.n_tool} tool, {report.n_general} general)")
    test_report = validate_jsonl(out / "tools_test.jsonl", purpose="test", min_examples=1)
    if not test_report.ok:
        raise SystemExit("tools_test does not validate:\n" + "\n".join(map(str, test_report.problems)))
    print(f"tools_test: ok ({test_report.n_examples} lines)")
    bad = validate_jsonl(out / "bad_example.jsonl")
    shown = {p.code for p in bad.problems}
    expected = {code for code, _ in BAD_LINES}
    if not expected <= shown:
        raise SystemExit(f"bad_example.jsonl misses codes {sorted(expected - shown)}")
    print(f"bad_example: refused with {len(bad.problems)} problems, codes {sorted(shown)}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="bfcl-eval wheel or folder (default as in build_bfcl_data.py)")
    parser.add_argument("--out", default=str(ROOT / "examples"), help="output folder (default: examples/)")
    parser.add_argument("--skip-general", action="store_true", help="keep general.jsonl, do not load the model")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sides = bfcl.split_records(bfcl.load_records(bfcl.find_source(args.source)))
    _write_jsonl(out / "tools_train.jsonl", tool_train_examples(sides["train"]))
    _write_jsonl(out / "tools_test.jsonl", tool_test_examples(sides["test"]))
    (out / "tools.json").write_text(json.dumps(DEMO_TOOLS, indent=2) + "\n", encoding="utf-8")
    (out / "bad_example.jsonl").write_text("".join(line + "\n" for _, line in BAD_LINES), encoding="utf-8")
    if not args.skip_general:
        _write_jsonl(out / "general.jsonl", general_examples(general_prompts()))
    elif not (out / "general.jsonl").is_file():
        raise SystemExit("--skip-general needs an existing general.jsonl")
    check(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
