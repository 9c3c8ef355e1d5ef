"""Rendering, tool-call text round trips, and the assistant-only loss mask of encode_example."""

from __future__ import annotations

import copy
import json

import pytest

from citi_engine.data.chat_format import (
    IGNORE_INDEX,
    encode_example,
    format_tool_calls,
    parse_tool_calls,
    render_conversation,
    render_prompt,
    supports_tools,
    template_caps,
)
from citi_engine.data.validate import check_lengths

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather.current",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "currency.convert",
        "description": "Convert money.",
        "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}}},
    },
}

# A small template that renders tools and calls itself (in the Hugging Face convention).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}\n"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A ChatML template that refuses the tool role, as some models' templates do.
NO_TOOL_ROLE_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def call(name: str, arguments: dict, id_: str = "call_a") -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def calls_as_pairs(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from citi_engine.testing import smollm2_tokenizer_dir

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


@pytest.fixture()
def tool_template_tokenizer(smollm2):
    tok = copy.deepcopy(smollm2)
    tok.chat_template = TOOL_TEMPLATE
    return tok


# ----------------------------------------------------------------------------------------------------------------
# format_tool_calls <-> parse_tool_calls


@pytest.mark.parametrize(
    "pairs",
    [
        [("weather.current", {"city": "Oslo"})],
        [("weather.current", {"city": "Oslo"}), ("weather.current", {"city": "Lima"}),
         ("currency.convert", {"amount": 12.5, "to": "EUR"})],
        [("a.b.c_d-e", {"nested": {"xs": [1, 2, {"k": None}], "flag": True}, "text": "</tool_call> inside"})],
        [("no_args", {})],
        [("unicode", {"city": "Zürich", "note": "naïve \"quoted\" \\ backslash"})],
    ],
)
def test_formatted_calls_parse_back_to_the_same_calls(pairs):
    calls = [call(name, args, f"call_{i}") for i, (name, args) in enumerate(pairs)]
    text = format_tool_calls(calls)
    content, parsed = parse_tool_calls(text)
    assert content is None
    assert calls_as_pairs(parsed) == pairs
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed)
    assert len({c["id"] for c in parsed}) == len(parsed)


def test_format_accepts_decoded_arguments_and_writes_one_block_per_call():
    text = format_tool_calls([{"function": {"name": "f", "arguments": {"x": 1}}}, call("g", {})])
    assert text == '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n' \
                   '<tool_call>{"name": "g", "arguments": {}}</tool_call>'


def test_parser_tolerates_whitespace_around_and_inside_blocks():
    text = ' \n<tool_call>\n  {"name": "weather.current",\n "arguments": {"city": "Oslo"}}  \n</tool_call>' \
           '<tool_call>{"name":"f","arguments":{}}</tool_call>\n\n'
    content, calls = parse_tool_calls(text)
    assert content is None
    assert calls_as_pairs(calls) == [("weather.current", {"city": "Oslo"}), ("f", {})]


def test_malformed_blocks_stay_in_the_content_and_good_ones_still_parse():
    broken = '<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>'  # missing brace
    no_args = '<tool_call>{"name": "g"}</tool_call>'
    string_args = '<tool_call>{"name": "h", "arguments": "{\\"x\\": 1}"}</tool_call>'
    good = '<tool_call>{"name": "k", "arguments": {"y": 2}}</tool_call>'
    content, calls = parse_tool_calls(f"{broken}\n{no_args}\n{string_args}\n{good}")
    assert calls_as_pairs(calls) == [("k", {"y": 2})]
    assert content == f"{broken}\n{no_args}\n{string_args}"
    unclosed = '<tool_call>{"name": "f", "arguments": {"x": 1}}'
    assert parse_tool_calls(unclosed) == (unclosed, [])


def test_plain_answers_and_text_around_calls_are_content():
    assert parse_tool_calls("  The capital of France is Paris.\n") == ("The capital of France is Paris.", [])
    content, calls = parse_tool_calls('Let me check.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert content == "Let me check." and calls_as_pairs(calls) == [("f", {})]


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def test_smollm2_template_gets_our_builtin_tool_format(smollm2):
    assert not supports_tools(smollm2)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo and Lima?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("weather.current", {"city": "Oslo"}, "c1"), call("weather.current", {"city": "Lima"}, "c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 19}'},
    ]
    text = render_prompt(smollm2, messages, [WEATHER, CONVERT])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    assert '{"name": "weather.current", "description": "Current weather in a city."' in system
    assert '"name": "currency.convert"' in system and "<tool_call>" in system
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "weather.current", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "weather.current", "arguments": {"city": "Lima"}}</tool_call><|im_end|>\n'
    ) in text
    assert '<|im_start|>tool\n{"temp": 3}<|im_end|>\n<|im_start|>tool\n{"temp": 19}<|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n")
    # the tool block becomes the system turn when there is no system text; no tools leaves the template alone
    no_system = render_prompt(smollm2, messages[1:2], [WEATHER])
    assert no_system.startswith("<|im_start|>system\nYou can call the following functions")
    plain = render_prompt(smollm2, messages[1:2])
    assert plain == smollm2.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)


def test_a_template_with_tool_support_receives_tools_and_decoded_calls(tool_template_tokenizer):
    tok = tool_template_tokenizer
    assert supports_tools(tok)
    messages = [{"role": "user", "content": "Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call("weather.current", {"city": "Oslo"})]}]
    text = render_conversation(tok, messages, [WEATHER, CONVERT])
    assert text.startswith("<|im_start|>system\nTOOLS: weather.current currency.convert<|im_end|>\n")
    assert 'CALL weather.current {"city": "Oslo"}' in text
    assert "<tool_call>" not in text and "You can call" not in text


def test_a_template_that_rejects_the_tool_role_gets_results_as_marked_user_turns(smollm2):
    tok = copy.deepcopy(smollm2)
    tok.chat_template = NO_TOOL_ROLE_TEMPLATE
    caps = template_caps(tok)
    assert not caps.tools and not caps.tool_role and caps.system_role
    messages = [{"role": "user", "content": "Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call("weather.current", {"city": "Oslo"}, "c9")]},
                {"role": "tool", "tool_call_id": "c9", "content": "3 degrees"}]
    text = render_prompt(tok, messages, [WEATHER])
    assert "<|im_start|>user\nResult of the tool call weather.current:\n3 degrees<|im_end|>\n" in text


# ----------------------------------------------------------------------------------------------------------------
# encode_example


def labelled_text(tok, encoded) -> str:
    return tok.decode([t for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab != IGNORE_INDEX])


def test_loss_covers_exactly_the_assistant_turns_and_their_end_tokens(smollm2):
    example = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call("weather.current", {"city": "Oslo"})]},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "It is 3 degrees in Oslo."},
        ],
        "tools": [WEATHER],
    }
    encoded = encode_example(smollm2, example, 2048)
    assert encoded["task_type"] == 1 and not encoded["truncated"]
    assert encoded["num_tokens"] == len(encoded["input_ids"]) == len(encoded["labels"])
    expected = ('<tool_call>{"name": "weather.current", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>'
                "It is 3 degrees in Oslo.<|im_end|>")
    assert labelled_text(smollm2, encoded) == expected
    # labelled positions hold their own token ids, and the input is the rendered conversation
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(encoded["input_ids"], encoded["labels"], strict=True))
    assert smollm2.decode(encoded["input_ids"]) == render_conversation(smollm2, example["messages"], [WEATHER])
    # the labelled tokens form two contiguous runs, one per assistant turn
    mask = [lab != IGNORE_INDEX for lab in encoded["labels"]]
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert runs == 2


def test_weight_zero_turns_are_masked_and_general_examples_have_task_type_zero(smollm2):
    example = {"messages": [
        {"role": "user", "content": "Say one."}, {"role": "assistant", "content": "One.", "weight": 0},
        {"role": "user", "content": "Say two."}, {"role": "assistant", "content": "Two!"},
    ]}
    encoded = encode_example(smollm2, example, 512)
    assert encoded["task_type"] == 0
    assert labelled_text(smollm2, encoded) == "Two!<|im_end|>"
    example["messages"][1]["weight"] = 1
    assert labelled_text(smollm2, encode_example(smollm2, example, 512)) == "One.<|im_end|>Two!<|im_end|>"


def test_masking_works_the_same_with_a_tool_supporting_template(tool_template_tokenizer):
    tok = tool_template_tokenizer
    example = {"messages": [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call("weather.current", {"city": "Oslo"})]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "Three degrees."},
    ], "tools": [WEATHER]}
    encoded = encode_example(tok, example, 512)
    assert labelled_text(tok, encoded) == 'CALL weather.current {"city": "Oslo"}\n<|im_end|>Three degrees.<|im_end|>'


def test_long_examples_are_cut_and_reported_not_silently(smollm2):
    example = {"messages": [{"role": "user", "content": "Count."},
                            {"role": "assistant", "content": " ".join(str(i) for i in range(200))}]}
    full = encode_example(smollm2, example, 4096)
    cut = encode_example(smollm2, example, 64)
    assert cut["truncated"] and cut["num_tokens"] == full["num_tokens"] > 64
    assert len(cut["input_ids"]) == len(cut["labels"]) == 64
    assert cut["input_ids"] == full["input_ids"][:64] and cut["labels"] == full["labels"][:64]
    problems = check_lengths([example], smollm2, 64)
    assert [(p.line, p.code) for p in problems] == [(1, "too_long")]
    assert str(full["num_tokens"]) in problems[0].message


def test_a_template_that_rewrites_earlier_turns_is_refused(smollm2):
    tok = copy.deepcopy(smollm2)
    # renders only the last assistant turn in full: not prefix-stable, so spans cannot be found by diffing
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}...{% else %}"
        "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    example = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(ValueError, match="prefix"):
        encode_example(tok, example, 512)
