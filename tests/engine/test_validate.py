"""The training-file validator: every problem code, reported all at once with line numbers and fixes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from citi_engine.data.schemas import PROBLEM_CODES, Problem, TaskType, task_type_of
from citi_engine.data.validate import ValidationReport, check_lengths, validate_jsonl
from citi_engine.errors import DataValidationError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather.current",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name: str = "weather.current", arguments: str = '{"city": "Oslo"}') -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def general(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}


def tool_example(**assistant) -> dict:
    turn = {"role": "assistant", "content": None, "tool_calls": [call()], **assistant}
    return {"messages": [{"role": "user", "content": "Weather in Oslo?"}, turn], "tools": [WEATHER]}


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def with_good(bad, n_good: int = 10) -> bytes:
    """A file of good lines with ``bad`` as line 3."""
    rows = [general(i) for i in range(n_good)]
    rows.insert(2, bad)
    return jsonl(*rows)


def only(report: ValidationReport) -> Problem:
    assert len(report.problems) == 1, [str(p) for p in report.problems]
    return report.problems[0]


# ----------------------------------------------------------------------------------------------------------------


def test_good_file_is_accepted_with_counts_and_examples():
    report = validate_jsonl(jsonl(*[general(i) for i in range(8)], tool_example(), tool_example()))
    assert report.ok and report.problems == []
    assert (report.n_examples, report.n_tool, report.n_general) == (10, 2, 8)
    assert len(report.examples) == 10 and report.lines == list(range(1, 11))
    assert report.examples[8]["tools"][0]["function"]["name"] == "weather.current"
    assert report.to_dict() == {"ok": True, "n_examples": 10, "n_tool": 2, "n_general": 8, "problems": []}


@pytest.mark.parametrize(
    ("bad", "code", "hint"),
    [
        ('{"messages": [', "invalid_json", "one complete JSON object"),
        ("[1, 2, 3]", "not_an_object", "JSON object"),
        ('"just text"', "not_an_object", "got a string"),
        ({"prompt": "hi", "completion": "ho"}, "missing_messages", "no 'messages'"),
        ({"messages": []}, "missing_messages", "empty"),
        ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "ho"}]},
         "unknown_role", "'user' is probably meant"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
         "empty_assistant_turn", "no text and no tool calls"),
        (tool_example(tool_calls=[call(arguments="{city: Oslo}")]), "invalid_arguments_json", "not valid JSON"),
        (tool_example(tool_calls=[call(arguments='["Oslo"]')]), "invalid_arguments_json", "must encode an object"),
        (tool_example(tool_calls=[call(name="weather.now")]), "unknown_function", "does not define"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho", "weight": 0}]},
         "no_trainable_turn", "weight"),
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
         "no_trainable_turn", "add the assistant's answer"),
        ({"messages": "hi"}, "invalid_field", "must be a list"),
        ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "ho"}]},
         "invalid_field", "content must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho", "weight": 2}]},
         "invalid_field", "weight must be 0 or 1"),
        (tool_example(tool_calls=[{"id": "c", "type": "function",
                                   "function": {"name": "weather.current", "arguments": {"city": "Oslo"}}}]),
         "invalid_field", "json.dumps"),
        ({**general(), "tools": {"name": "x"}}, "invalid_field", "'tools' must be a list"),
        ({**general(), "tools": [WEATHER, WEATHER]}, "invalid_field", "a second time"),
        ({**general(), "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "invalid_field",
         "letters, digits"),
    ],
)
def test_each_bad_line_is_reported_with_its_code_line_and_fix(bad, code, hint):
    problem = only(validate_jsonl(with_good(bad)))
    assert problem.code == code
    assert problem.line == 3
    assert hint in problem.message
    assert str(problem) == f"line 3: {code}: {problem.message}"
    assert problem.to_dict() == {"line": 3, "code": code, "message": problem.message}


@pytest.mark.parametrize(
    ("parameters", "where"),
    [
        ({"type": "object", "properties": {"city": {"type": "dict"}}}, "properties/city/type"),
        ({"type": "object", "properties": {"city": {"type": "string"}}, "required": "city"}, "required"),
        ({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "float"}}}},
         "properties/xs/items/type"),
        ({"type": "dict", "properties": {}}, "\"type\": \"object\""),
        ("city: string", "JSON Schema object"),
    ],
)
def test_tool_parameters_must_be_valid_json_schema(parameters, where):
    tool = {"type": "function", "function": {"name": "weather.current", "parameters": parameters}}
    problem = only(validate_jsonl(with_good({**tool_example(), "tools": [tool]})))
    assert problem.code == "invalid_tool_schema"
    assert where in problem.message and "weather.current" in problem.message


def test_invalid_utf8_is_reported_per_line():
    data = with_good(general()).replace(b"Say 0.", "Say \u00e9.".encode("latin-1"), 1)
    problem = only(validate_jsonl(data))
    assert (problem.line, problem.code) == (1, "invalid_encoding")
    assert "UTF-8" in problem.message


def test_too_few_examples_is_a_whole_file_problem_on_line_zero():
    problem = only(validate_jsonl(jsonl(general(1), general(2))))
    assert (problem.line, problem.code) == (0, "too_few_examples")
    assert "2 example" in problem.message and "10" in problem.message
    assert validate_jsonl(jsonl(general(1), general(2)), min_examples=2).ok
    assert only(validate_jsonl(b"")).code == "too_few_examples"


def test_every_problem_is_reported_at_once_and_the_file_is_refused_whole():
    rows = [general(i) for i in range(12)]
    rows[0] = "{oops"
    rows[4] = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": ""}]}
    rows[9] = tool_example(tool_calls=[call(name="nope", arguments="{")])
    report = validate_jsonl(jsonl(*rows))
    found = [(p.line, p.code) for p in report.problems]
    assert found == [
        (1, "invalid_json"),
        (5, "unknown_role"),
        (5, "empty_assistant_turn"),
        (10, "unknown_function"),
        (10, "invalid_arguments_json"),
    ]
    assert not report.ok and report.examples == []
    assert report.n_examples == 12
    with pytest.raises(DataValidationError) as err:
        report.raise_if_invalid()
    assert len(err.value.problems) == 5 and err.value.to_dict()["details"][0]["code"] == "invalid_json"


def test_blank_lines_are_skipped_but_count_for_line_numbers():
    rows = jsonl(*[general(i) for i in range(10)]).split(b"\n")
    rows.insert(3, b"   ")
    rows.insert(1, b"")
    data = b"\n".join(rows).replace(b'"Say 5."', b'"Say 5."  , ]', 1)
    report = validate_jsonl(data)
    assert [(p.line, p.code) for p in report.problems] == [(8, "invalid_json")]
    good = validate_jsonl(b"\n".join(rows))
    assert good.ok and good.n_examples == 10 and good.lines[:4] == [1, 3, 4, 6]


def test_crlf_bom_path_and_text_inputs_are_read(tmp_path):
    data = b"\xef\xbb\xbf" + jsonl(*[general(i) for i in range(10)]).replace(b"\n", b"\r\n")
    assert validate_jsonl(data).ok
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    assert validate_jsonl(path).ok and validate_jsonl(str(path)).ok
    assert validate_jsonl(data.decode("utf-8-sig")).ok


def test_dotted_function_names_and_bare_tool_shape_are_accepted_and_normalised():
    bare = {"name": "math.add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    example = {
        "messages": [{"role": "user", "content": "1+1"},
                     {"role": "assistant", "tool_calls": [call("math.add", '{"a": 1}')]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "2"},
                     {"role": "assistant", "content": "2", "weight": 1}],
        "tools": [bare],
    }
    report = validate_jsonl(jsonl(example), min_examples=1)
    assert report.ok, [str(p) for p in report.problems]
    assert report.examples[0]["tools"] == [{"type": "function", "function": bare}]
    assert report.n_tool == 1


def test_task_type_follows_tools_or_calls():
    assert task_type_of(general()) == TaskType.GENERAL
    assert task_type_of(tool_example()) == TaskType.TOOL
    assert task_type_of({**general(), "tools": [WEATHER]}) == TaskType.TOOL


def test_test_purpose_checks_ground_truth_instead_of_trainable_turns():
    line = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER],
            "category": "simple_python", "ground_truth": [{"weather.current": {"city": ["Oslo", "oslo"]}}]}
    irrelevant = {**line, "ground_truth": []}
    exact = tool_example()  # training format: the last assistant turn is the expected answer
    assert validate_jsonl(jsonl(line, irrelevant, exact), purpose="test", min_examples=1).ok
    bad = validate_jsonl(
        jsonl({**line, "ground_truth": [{"weather.now": {"city": ["Oslo"]}}]}, {**line, "ground_truth": None},
              {**line, "ground_truth": [{"weather.current": {"city": "Oslo"}}]}),
        purpose="test", min_examples=1,
    )
    assert [(p.line, p.code) for p in bad.problems] == [(1, "unknown_function"), (2, "invalid_field"),
                                                         (3, "invalid_field")]
    # the same lines are not training data
    assert only(validate_jsonl(jsonl(line), min_examples=1)).code == "no_trainable_turn"


def test_too_long_comes_from_check_lengths_with_a_tokenizer():
    from transformers import AutoTokenizer

    from citi_engine.testing import smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    long_answer = {"messages": [{"role": "user", "content": "Count."},
                                {"role": "assistant", "content": " ".join(str(i) for i in range(300))}]}
    rows = [general(i) for i in range(10)]
    rows.insert(1, "")
    rows.insert(5, long_answer)
    report = validate_jsonl(jsonl(*rows))
    assert report.ok
    problems = check_lengths(report.examples, tokenizer, 128, lines=report.lines)
    assert [(p.line, p.code) for p in problems] == [(6, "too_long")]
    assert "more than max_length=128" in problems[0].message
    assert check_lengths(report.examples, tokenizer, 4096) == []


def test_every_code_is_documented_and_covered():
    covered = {
        "invalid_encoding", "invalid_json", "not_an_object", "missing_messages", "invalid_field", "unknown_role",
        "empty_assistant_turn", "invalid_arguments_json", "unknown_function", "invalid_tool_schema",
        "no_trainable_turn", "too_few_examples", "too_long",
    }
    assert set(PROBLEM_CODES) == covered


def test_importing_the_validator_pulls_in_neither_torch_nor_transformers():
    code = (
        "import sys, citi_engine.data.validate, citi_engine.data.chat_format, citi_engine.data.prompts\n"
        "from citi_engine.data.validate import validate_jsonl\n"
        "validate_jsonl(b'{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\\n', min_examples=1)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_multi_megabyte_file_validates_in_one_quick_pass():
    # Distinct tool schemas on every line: the worst case for the schema check.
    rows = []
    for i in range(4000):
        tool = {"type": "function", "function": {"name": f"fn_{i}", "description": "x" * 200, "parameters": {
            "type": "object", "properties": {f"p{j}_{i}": {"type": "string", "description": "y" * 40}
                                             for j in range(6)}}}}
        rows.append({"messages": [{"role": "user", "content": "z" * 300},
                                  {"role": "assistant", "tool_calls": [call(f"fn_{i}", '{"p0": "a"}')]}],
                     "tools": [tool]})
    data = jsonl(*rows)
    assert len(data) > 5_000_000
    start = time.process_time()  # CPU time: the shared test machine's load must not decide the outcome
    report = validate_jsonl(data)
    elapsed = time.process_time() - start
    assert report.ok and report.n_tool == 4000
    assert elapsed < 20, f"validating {len(data) / 1e6:.1f} MB took {elapsed:.1f} s"


def test_the_sample_files_in_examples_are_valid_and_the_bad_one_shows_many_codes():
    combined = (EXAMPLES / "tools_train.jsonl").read_bytes() + (EXAMPLES / "general.jsonl").read_bytes()
    report = validate_jsonl(combined)
    assert report.ok, [str(p) for p in report.problems]
    assert report.n_tool >= 24 and report.n_general >= 20
    assert validate_jsonl(EXAMPLES / "tools_test.jsonl", purpose="test", min_examples=1).ok
    tools = json.loads((EXAMPLES / "tools.json").read_text())
    demo = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "tools": tools}
    assert validate_jsonl(jsonl(demo), min_examples=1).ok
    bad = validate_jsonl(EXAMPLES / "bad_example.jsonl")
    assert not bad.ok
    assert len({p.code for p in bad.problems}) >= 8
    assert all(p.line >= 1 for p in bad.problems)
