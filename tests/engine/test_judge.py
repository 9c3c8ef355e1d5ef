"""The AST judge, the test-set reader, scoring and the report writer, on hand-made cases (no model)."""

from __future__ import annotations

import json

import pytest

from citi_engine.errors import DataValidationError
from citi_engine.evaluate import score_replies, write_report
from citi_engine.evaluate.judge import REASONS, exact_ground_truth, judge, normalize_string
from citi_engine.evaluate.tool_eval import ToolCase, load_tool_cases, stratified_head


def tool(name, properties, required=()):
    return {"type": "function", "function": {"name": name, "description": "",
            "parameters": {"type": "object", "properties": properties, "required": list(required)}}}


WEATHER = tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"},
                               "unit": {"type": "string"}}, required=["city"])
AREA = tool("area", {"radius": {"type": "number"}, "exact": {"type": "boolean"},
                     "sides": {"type": "array", "items": {"type": "integer"}},
                     "opts": {"type": "object", "properties": {"mode": {"type": "string"}, "n": {"type": "integer"}}}},
            required=["radius"])
TOOLS = [WEATHER, AREA]

GT_WEATHER = [{"get_weather": {"city": ["San Francisco", "SF"], "days": [3], "unit": ["celsius", ""]}}]


def call(name, **arguments):
    """An OpenAI-shaped call, as parse_tool_calls returns them (arguments as a JSON string)."""
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# ------------------------------------------------------------------------------------------ passes


def test_exact_call_passes():
    v = judge([call("get_weather", city="San Francisco", days=3, unit="celsius")], GT_WEATHER, TOOLS)
    assert v.correct and v.reason is None


def test_parameter_whose_answers_include_empty_string_may_be_omitted():
    assert judge([call("get_weather", city="SF", days=3)], GT_WEATHER, TOOLS).correct


def test_strings_compare_case_whitespace_and_punctuation_insensitively():
    assert normalize_string("  San-Francisco. ") == normalize_string("san francisco")
    assert judge([call("get_weather", city=" san   francisco.", days=3)], GT_WEATHER, TOOLS).correct
    assert judge([call("get_weather", city="'SF'", days=3)], GT_WEATHER, TOOLS).correct


def test_integer_passes_for_number_but_float_not_for_integer():
    gt = [{"area": {"radius": [5.0]}}]
    assert judge([call("area", radius=5)], gt, TOOLS).correct
    assert judge([call("area", radius=5.0)], gt, TOOLS).correct
    v = judge([call("get_weather", city="SF", days=3.0)], GT_WEATHER, TOOLS)
    assert (v.correct, v.reason) == (False, "wrong_type")


def test_parallel_calls_match_in_any_order():
    gt = [{"get_weather": {"city": ["Paris"], "days": [1]}}, {"get_weather": {"city": ["Rome"], "days": [2]}},
          {"area": {"radius": [2]}}]
    calls = [call("area", radius=2), call("get_weather", city="Rome", days=2), call("get_weather", city="Paris", days=1)]
    assert judge(calls, gt, TOOLS).correct


def test_parallel_assignment_is_not_greedy():
    # The first call fits both answers; a greedy first-fit would take the wrong one and fail.
    gt = [{"get_weather": {"city": ["Paris", "Rome"], "days": [1]}}, {"get_weather": {"city": ["Paris"], "days": [1]}}]
    calls = [call("get_weather", city="Rome", days=1), call("get_weather", city="Paris", days=1)]
    assert judge(calls, gt, TOOLS).correct
    calls = [call("get_weather", city="Paris", days=1), call("get_weather", city="Rome", days=1)]
    assert judge(calls, gt, TOOLS).correct


def test_lists_and_nested_objects_use_the_same_rules():
    gt = [{"area": {"radius": [1], "sides": [[3, 4, 5]], "opts": [{"mode": ["Fast"], "n": ["", 2]}],
                    "exact": [True]}}]
    assert judge([call("area", radius=1, sides=[3, 4, 5], opts={"mode": "fast"}, exact=True)], gt, TOOLS).correct
    v = judge([call("area", radius=1, sides=[3, 5, 4], opts={"mode": "fast"}, exact=True)], gt, TOOLS)
    assert v.reason == "wrong_value"
    v = judge([call("area", radius=1, sides=[3, 4, 5], opts={"mode": "slow"}, exact=True)], gt, TOOLS)
    assert v.reason == "wrong_value"
    v = judge([call("area", radius=1, sides=[3, 4, "5"], opts={"mode": "fast"}, exact=True)], gt, TOOLS)
    assert v.reason == "wrong_type"


def test_irrelevance_passes_with_plain_text():
    assert judge([], [], TOOLS, text="None of my tools can book a flight.").correct


# ---------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("calls", "text", "reason"),
    [
        ([call("get_forecast", city="SF", days=3)], "", "wrong_name"),
        ([call("get_weather", days=3)], "", "missing_parameter"),  # required by the schema
        ([call("get_weather", city="SF")], "", "missing_parameter"),  # not omittable per the answer
        ([call("get_weather", city="SF", days=3, country="US")], "", "unexpected_parameter"),
        ([call("get_weather", city="SF", days="3")], "", "wrong_type"),
        ([call("get_weather", city="SF", days=True)], "", "wrong_type"),  # a boolean is not an integer
        ([call("get_weather", city="Los Angeles", days=3)], "", "wrong_value"),
        ([call("get_weather", city="SF", days=4)], "", "wrong_value"),
        ([call("get_weather", city="SF", days=3), call("get_weather", city="LA", days=3)], "", "wrong_count"),
        ([], "It is sunny in San Francisco.", "no_call"),
        ([], '<tool_call>{"name": "get_weather", "arguments": {"city": "SF"</tool_call>', "unparseable"),
    ],
)
def test_each_failure_kind_has_its_reason(calls, text, reason):
    v = judge(calls, GT_WEATHER, TOOLS, text=text)
    assert not v.correct
    assert v.reason == reason
    assert v.detail


def test_arguments_that_are_not_json_are_unparseable():
    bad = {"type": "function", "function": {"name": "get_weather", "arguments": "{city: SF}"}}
    assert judge([bad], GT_WEATHER, TOOLS).reason == "unparseable"


def test_a_call_where_none_fits_is_unexpected_call():
    v = judge([call("get_weather", city="SF", days=1)], [], TOOLS, text="")
    assert (v.correct, v.reason) == (False, "unexpected_call")


def test_parameter_present_in_schema_but_not_in_answer_is_unexpected():
    gt = [{"get_weather": {"city": ["SF"], "days": [3]}}]
    v = judge([call("get_weather", city="SF", days=3, unit="celsius")], gt, TOOLS)
    assert v.reason == "unexpected_parameter"


def test_parallel_failure_names_the_parameter_that_went_wrong():
    gt = [{"get_weather": {"city": ["Paris"], "days": [1]}}, {"area": {"radius": [2]}}]
    v = judge([call("area", radius=2), call("get_weather", city="Paris", days=9)], gt, TOOLS)
    assert v.reason == "wrong_value" and "days" in v.detail


def test_every_reason_is_covered_by_a_test_above():
    assert set(REASONS) == {"wrong_name", "missing_parameter", "unexpected_parameter", "wrong_type", "wrong_value",
                            "wrong_count", "no_call", "unexpected_call", "unparseable"}


# ----------------------------------------------------------------------------------------- reading


def test_training_format_line_gives_exact_ground_truth(tmp_path):
    line = {"messages": [{"role": "user", "content": "weather in SF for 3 days"},
                         {"role": "assistant", "tool_calls": [call("get_weather", city="SF", days=3)]}],
            "tools": TOOLS}
    irrelevant = {"messages": [{"role": "user", "content": "book a flight"},
                               {"role": "assistant", "content": "I cannot."}], "tools": TOOLS}
    given = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "category": "simple_python",
             "ground_truth": GT_WEATHER}
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in (line, irrelevant, given)) + "\n")
    cases = load_tool_cases(path)
    assert [c.category for c in cases] == ["multiple", "irrelevance", "simple_python"]
    assert cases[0].messages == line["messages"][:1]
    assert cases[0].ground_truth == [{"get_weather": {"city": ["SF"], "days": [3]}}]
    assert cases[1].ground_truth == []
    assert judge([call("get_weather", city="sf", days=3)], cases[0].ground_truth, cases[0].tools).correct
    assert judge([call("get_weather", city="SF", days=4)], cases[0].ground_truth, cases[0].tools).reason \
        == "wrong_value"


def test_exact_ground_truth_of_nested_values_is_judged_by_value():
    gt = exact_ground_truth([call("area", radius=1, opts={"mode": "fast", "n": 2}, sides=[1, 2])])
    assert judge([call("area", radius=1.0, opts={"n": 2, "mode": "Fast"}, sides=[1, 2])], gt, TOOLS).correct
    assert judge([call("area", radius=1, opts={"mode": "fast"}, sides=[1, 2])], gt, TOOLS).reason == "wrong_value"


def test_bfcl_question_file_with_its_answer_file(tmp_path):
    question = {"id": "simple_python_7", "question": [[{"role": "user", "content": "area of radius 3"}]],
                "function": [{"name": "geometry.area", "description": "d", "parameters": {
                    "type": "dict", "properties": {"radius": {"type": "float"}, "units": {"type": "string"},
                                                   "shape": {"type": "tuple", "items": {"type": "any"}}},
                    "required": ["radius"]}}]}
    (tmp_path / "possible_answer").mkdir()
    (tmp_path / "BFCL_v4_simple_python.json").write_text(json.dumps(question) + "\n")
    (tmp_path / "possible_answer" / "BFCL_v4_simple_python.json").write_text(
        json.dumps({"id": "simple_python_7", "ground_truth": [{"geometry.area": {"radius": [3.0], "units": ["", "cm"]}}]})
    )
    (case,) = load_tool_cases(tmp_path / "BFCL_v4_simple_python.json")
    params = case.tools[0]["function"]["parameters"]
    assert params["type"] == "object" and params["properties"]["radius"]["type"] == "number"
    assert params["properties"]["shape"] == {"type": "array", "items": {}}
    assert case.category == "simple_python"
    assert judge([call("geometry.area", radius=3)], case.ground_truth, case.tools).correct

    irr = {"id": "irrelevance_3", "question": [[{"role": "user", "content": "hi"}]], "function": question["function"]}
    (tmp_path / "BFCL_v4_irrelevance.json").write_text(json.dumps(irr) + "\n")
    (case,) = load_tool_cases(tmp_path / "BFCL_v4_irrelevance.json")
    assert case.ground_truth == [] and case.category == "irrelevance"


def test_bfcl_question_without_answers_says_which_file_to_pass(tmp_path):
    question = {"id": "parallel_1", "question": [[{"role": "user", "content": "q"}]], "function": []}
    (tmp_path / "BFCL_v4_parallel.json").write_text(json.dumps(question) + "\n")
    with pytest.raises(DataValidationError, match="possible_answer/BFCL_v4_parallel.json"):
        load_tool_cases(tmp_path / "BFCL_v4_parallel.json")


def test_bad_test_lines_are_refused_with_line_and_fix(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}], "tools": [WEATHER]}) + "\n")
    with pytest.raises(DataValidationError, match="line 1.*ground_truth"):
        load_tool_cases(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}], "tools": [WEATHER],
                                "ground_truth": [{"nope": {}}]}) + "\n")
    with pytest.raises(DataValidationError, match="'nope'.*not among the line's tools"):
        load_tool_cases(path)
    path.write_text("{not json\n")
    with pytest.raises(DataValidationError, match="line 1 is not valid JSON"):
        load_tool_cases(path)


def test_limit_keeps_every_category():
    cases = [ToolCase(str(i), cat, [], [], []) for i, cat in enumerate(["a"] * 10 + ["b"] * 3 + ["c"] * 2)]
    picked = stratified_head(cases, 6)
    assert [c.category for c in picked] == ["a", "a", "b", "b", "c", "c"]


# ------------------------------------------------------------------------------------ scoring, report


def _cases():
    return [
        ToolCase("s1", "simple", [{"role": "user", "content": "q"}], [WEATHER], GT_WEATHER),
        ToolCase("s2", "simple", [{"role": "user", "content": "q"}], [WEATHER], GT_WEATHER),
        ToolCase("p1", "parallel", [{"role": "user", "content": "q"}], [WEATHER], GT_WEATHER * 2),
        ToolCase("i1", "irrelevance", [{"role": "user", "content": "q"}], [WEATHER], []),
        ToolCase("i2", "irrelevance", [{"role": "user", "content": "q"}], [WEATHER], []),
    ]


def _replies():
    ok = call("get_weather", city="SF", days=3)
    return [
        {"text": "", "tool_calls": [ok]},
        {"text": "The weather is nice.", "tool_calls": []},
        {"text": "", "tool_calls": [ok, ok]},
        {"text": "I can't.", "tool_calls": []},
        {"text": "", "tool_calls": [ok]},
    ]


def test_scores_sum_up_per_category_with_parse_rate_and_irrelevance():
    r = score_replies(_cases(), _replies())
    assert (r.n, r.correct) == (5, 3)
    assert r.accuracy == pytest.approx(0.6)
    assert r.per_category["simple"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert r.per_category["parallel"]["accuracy"] == 1.0
    assert r.parse_rate == pytest.approx(2 / 3)
    assert r.irrelevance_accuracy == pytest.approx(0.5)
    assert r.failure_counts == {"no_call": 1, "unexpected_call": 1}
    assert [f["id"] for f in r.failures] == ["s2", "i2"]
    assert [o["correct"] for o in r.outcomes] == [True, False, True, True, False]


def test_report_files_are_written_next_to_the_adapter(tmp_path):
    tool = score_replies(_cases(), _replies()).to_dict()
    retention = {"general_retention": 0.9, "kl": 0.105, "agreement": 0.5, "n_probes": 2, "answer_tokens": 10,
                 "per_probe": [{"kl": 0.1, "tokens": 5, "agree": True}, {"kl": 0.11, "tokens": 5, "agree": False}],
                 "disagreements": [{"prompt": "p", "base": "a", "tuned": "b"}],
                 "humaneval": {"n": 1, "tokens": 9, "base_nll": 1.5, "tuned_nll": 1.6, "nll_delta": 0.1}}
    paths = write_report(tmp_path, {"model": "tiny", "tool": tool, "retention": retention})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"]["tool_accuracy"] == pytest.approx(0.6)
    assert saved["summary"]["general_retention"] == 0.9
    md = (tmp_path / "report.md").read_text()
    assert "| simple | 2 | 1 | 50.0% |" in md and "no_call" in md and "s2" in md
    for name in ("tool_accuracy", "failures", "retention"):
        assert paths[name].is_file() and paths[name].read_bytes()[:4] == b"\x89PNG"


def test_abstention_curve_turns_weak_calls_into_text_replies():
    from citi_engine.evaluate.tool_eval import abstention_curve

    outcomes = [  # greedy: two right calls, one wrong call, a call where none fits, one right abstention
        {"category": "simple", "correct": True, "expects_call": True},
        {"category": "simple", "correct": True, "expects_call": True},
        {"category": "simple", "correct": False, "expects_call": True},
        {"category": "irrelevance", "correct": False, "expects_call": False},
        {"category": "irrelevance", "correct": True, "expects_call": False},
    ]
    margins = [5.0, 1.0, 0.5, 2.0, -3.0]
    rows = {r["threshold"]: r for r in abstention_curve(outcomes, margins, [0.0, 1.5, 3.0, 10.0])}
    assert rows[0.0] == {"threshold": 0.0, "tool_accuracy": 0.6, "irrelevance_accuracy": 0.5, "held_back": 0}
    assert rows[1.5]["tool_accuracy"] == 0.4 and rows[1.5]["held_back"] == 2  # the 1.0 call is lost, 0.5 was wrong
    assert rows[3.0]["irrelevance_accuracy"] == 1.0 and rows[3.0]["tool_accuracy"] == 0.6
    assert rows[10.0] == {"threshold": 10.0, "tool_accuracy": 0.4, "irrelevance_accuracy": 1.0, "held_back": 4}


def test_call_threshold_is_chosen_for_the_best_balanced_accuracy_on_the_held_out_set():
    from citi_engine.evaluate.tool_eval import choose_call_threshold

    outcomes = [  # three right calls, one wrong; two requests no tool fits, answered with calls anyway, one not
        {"category": "simple", "correct": True, "expects_call": True},
        {"category": "simple", "correct": True, "expects_call": True},
        {"category": "simple", "correct": True, "expects_call": True},
        {"category": "simple", "correct": False, "expects_call": True},
        {"category": "irrelevance", "correct": False, "expects_call": False},
        {"category": "irrelevance", "correct": False, "expects_call": False},
        {"category": "irrelevance", "correct": True, "expects_call": False},
    ]
    margins = [6.0, 5.0, 4.0, 0.5, 1.0, 2.0, -1.0]
    chosen = choose_call_threshold(outcomes, margins)
    # holding back everything below 3 (midpoint of 2 and 4) keeps the right calls and stops both wrong ones
    assert chosen["threshold"] == pytest.approx(3.0)
    assert chosen["at_threshold"]["call_accuracy"] == 0.75 and chosen["at_threshold"]["irrelevance_accuracy"] == 1.0
    assert chosen["at_zero"]["balanced_accuracy"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert (chosen["n_call_cases"], chosen["n_no_call_cases"]) == (4, 3)
    # a set with one kind of case only cannot choose: plain greedy decoding
    assert choose_call_threshold(outcomes[:4], margins[:4])["threshold"] == 0.0
    # when every call is right and no request lacks its tool, nothing is held back
    assert choose_call_threshold(outcomes[:3] + outcomes[6:], margins[:3] + margins[6:])["threshold"] == 0.0


def test_no_call_cases_built_from_held_out_calls_never_offer_the_called_function():
    from citi_engine.evaluate.tool_eval import cases_from_dicts, no_call_cases

    def tool(name):
        return {"type": "function", "function": {"name": name, "description": name,
                                                 "parameters": {"type": "object", "properties": {}}}}

    rows = [{"messages": [{"role": "user", "content": f"do {n}"}], "tools": [tool(n), tool(f"other_{i}")],
             "category": "simple", "ground_truth": [{n: {}}]} for i, n in enumerate(["alpha", "beta", "gamma"])]
    built = no_call_cases(cases_from_dicts(rows))
    assert sorted(c.messages[0]["content"] for c in built) == ["do alpha", "do beta", "do gamma"]
    for case in built:
        called = case.messages[0]["content"].removeprefix("do ")
        assert not case.expects_call and case.category == "irrelevance" and case.tools
        assert called not in {t["function"]["name"] for t in case.tools}
