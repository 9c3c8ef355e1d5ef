"""Constrained decoding through the whole service: the ``openai`` client against the API, which forwards to the
inference server. The tiny random base model samples hot, so it wants nothing in particular; forced calls and
JSON replies must parse and validate anyway, streamed or not. Schemas are bounded so replies end quickly.
Nothing asserts on the exact text a model writes."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from citi_engine.data.chat_format import TOOL_CALL_OPEN
from tests.inference.conftest import ASK, STOCK_TOOL, WEATHER_TOOL
from tests.inference.test_chat_e2e import _error, _post, _stream

pytestmark = pytest.mark.service

CITY = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "maxLength": 8},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                                             "required": ["city", "unit"], "additionalProperties": False}}}
TICKER = {"type": "function", "function": {"name": "get_stock_price", "description": "Latest price of a stock",
                                           "parameters": {"type": "object", "properties": {
                                               "ticker": {"type": "string", "maxLength": 5},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 30}},
                                               "required": ["ticker"], "additionalProperties": False}}}
TOOLS = [CITY, TICKER]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "ok"], "additionalProperties": False}
LOOKBEHIND = {"type": "object", "properties": {"code": {"type": "string", "pattern": "(?<=x)a"}}}
HOT = {"temperature": 1.5, "max_tokens": 60}


def _validate_calls(calls: list[tuple[str, str]], allowed=SCHEMAS) -> None:
    assert calls
    for name, arguments in calls:
        assert name in allowed
        jsonschema.validate(json.loads(arguments), allowed[name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_always_gives_valid_calls_from_a_random_model(stack, small_model, stream):
    client = stack.openai("alice")
    for seed in range(3):
        kwargs = dict(model=small_model, messages=ASK, tools=TOOLS, tool_choice="required", seed=seed,
                      parallel_tool_calls=False, **HOT)
        if stream:
            content, calls, finish, _ = _stream(client, **kwargs)
            _validate_calls([(c["name"], c["arguments"]) for c in calls])
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            _validate_calls([(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []])
            content, finish = choice.message.content, choice.finish_reason
        assert finish == "tool_calls" and not content


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_calls_only_that_function_with_valid_arguments(stack, small_model, stream):
    client = stack.openai("alice")
    named = {"type": "function", "function": {"name": "get_stock_price"}}
    for seed in range(2):
        kwargs = dict(model=small_model, messages=ASK, tools=TOOLS, tool_choice=named, seed=seed, **HOT)
        if stream:
            _, calls, _, _ = _stream(client, **kwargs)
            calls = [(c["name"], c["arguments"]) for c in calls]
        else:
            message = client.chat.completions.create(**kwargs).choices[0].message
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        _validate_calls(calls, {"get_stock_price": SCHEMAS["get_stock_price"]})


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_gives_json_that_validates(stack, small_model, stream):
    client = stack.openai("alice")
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    for seed in range(3):
        kwargs = dict(model=small_model, messages=ASK, response_format=fmt, seed=seed, **HOT)
        if stream:
            content, calls, finish, _ = _stream(client, **kwargs)
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            content, finish = choice.message.content, choice.finish_reason
        assert finish == "stop"
        jsonschema.validate(json.loads(content), ANSWER)


def test_json_schema_with_tools_under_auto_gives_that_json_or_valid_calls(stack, small_model):
    client = stack.openai("alice")
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    for seed in range(3):
        choice = client.chat.completions.create(model=small_model, messages=ASK, tools=TOOLS, response_format=fmt,
                                                parallel_tool_calls=False, seed=seed, **HOT).choices[0]
        if choice.message.tool_calls:
            _validate_calls([(c.function.name, c.function.arguments) for c in choice.message.tool_calls])
            assert choice.finish_reason == "tool_calls"
        else:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), ANSWER)


def test_json_object_response_format_starts_an_object_and_closes_it_when_it_stops(stack, small_model):
    client = stack.openai("alice")
    for seed in range(2):
        choice = client.chat.completions.create(model=small_model, messages=ASK, seed=seed, temperature=1.5,
                                                max_tokens=200, response_format={"type": "json_object"}).choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # any object: a random model may not close it within max_tokens
            assert choice.message.content.startswith("{")


def test_a_call_to_a_function_not_in_tools_is_never_a_tool_call(stack, weather_model):
    """The adapter learnt to call get_weather for this question; offered only the stock tool, under auto, its
    call to get_weather must not come back as a tool call, nor as call markup in the text. (What the model writes
    instead is its own: an overfit one may spell the call's JSON out in prose, which no grammar of text forbids.)"""
    client = stack.openai("alice")
    offered = client.chat.completions.create(model=weather_model, messages=ASK, tools=[WEATHER_TOOL], temperature=0,
                                             max_tokens=40).choices[0].message
    assert [c.function.name for c in offered.tool_calls] == ["get_weather"]  # it does call it when offered
    for stream in (False, True):
        kwargs = dict(model=weather_model, messages=ASK, tools=[STOCK_TOOL], temperature=0, max_tokens=40)
        if stream:
            content, calls, _, _ = _stream(client, **kwargs)
            names = [c["name"] for c in calls]
        else:
            message = client.chat.completions.create(**kwargs).choices[0].message
            names, content = [c.function.name for c in message.tool_calls or []], message.content
        assert "get_weather" not in names and set(names) <= {"get_stock_price"}
        assert TOOL_CALL_OPEN not in (content or "")


def test_schema_the_library_cannot_compile_is_400_with_code_and_param(stack, small_model):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": LOOKBEHIND}}
    err = _error(_post(stack, {"model": small_model, "messages": ASK, "response_format": fmt}), 400,
                 "invalid_response_format", "response_format.json_schema.schema")
    assert "look-around" in err["message"]
    tool = {"type": "function", "function": {"name": "lookup", "parameters": LOOKBEHIND}}
    _error(_post(stack, {"model": small_model, "messages": ASK, "tools": [CITY, tool], "tool_choice": "required"}),
           400, "invalid_tool_schema", "tools[1].function.parameters")


@pytest.mark.parametrize("body, code, param", [
    ({"response_format": {"type": "json_schema"}}, "invalid_response_format", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "invalid_response_format", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "unsupported_parameter", "stop"),
    ({"tools": [CITY], "tool_choice": "required", "stop": "x"}, "unsupported_parameter", "stop"),
])
def test_bad_response_format_or_stop_with_a_grammar_is_400_at_the_api(stack, small_model, body, code, param):
    _error(_post(stack, {"model": small_model, "messages": ASK, **body}), 400, code, param)


def test_inference_server_refuses_an_uncompilable_schema_itself(stack, small_model):
    """The API checks JSON Schema validity only (no grammar library there); the inference server compiles."""
    from tests.inference.conftest import INFERENCE_TOKEN

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": LOOKBEHIND}}
    r = httpx.post(stack.inference_url + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {INFERENCE_TOKEN}"},
                   json={"model": small_model, "messages": ASK, "response_format": fmt})
    _error(r, 400, "invalid_response_format", "response_format.json_schema.schema")


def test_rm_rf_in_generated_text_never_becomes_a_tool_call_streamed_or_not():
    """The server's own assembly of a reply, on text that calls an undefined function beside a defined one."""
    from citi_engine.serving import GenerationRequest
    from citi_service.chat import ChatCompletionRequest
    from worker.inference.app import ToolCallStream, build_completion

    req = ChatCompletionRequest(model="m", messages=ASK, tools=[CITY])
    text = ('<tool_call>{"name": "rm_rf", "arguments": {"path": "/"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>')
    gen = GenerationRequest(prompt_ids=[1], max_new_tokens=1, text=text, finish_reason="stop")
    message = build_completion(req, gen, 1, "citi-base")["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert "rm_rf" not in (message["content"] or "")
    assembler = ToolCallStream(req)
    deltas = [d for piece in (text[:25], text[25:90], text[90:]) for d in assembler.feed(piece)] + assembler.finish()
    names = [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls", []) if tc.get("function", {}).get("name")]
    assert names == ["get_weather"]
    assert "rm_rf" not in "".join(d.get("content") or "" for d in deltas)


def test_concurrent_requests_with_different_grammars_each_keep_their_own(stack, small_model):
    """Sent at once, they may share a batch: each row follows its own grammar, or none."""
    from concurrent.futures import ThreadPoolExecutor

    client = stack.openai("alice")
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    kinds = [dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), dict(response_format=fmt),
             dict(tools=TOOLS)] * 2
    with ThreadPoolExecutor(len(kinds)) as pool:
        replies = list(pool.map(lambda kw: client.chat.completions.create(model=small_model, messages=ASK, seed=1,
                                                                           **HOT, **kw), kinds))
    for kw, reply in zip(kinds, replies, strict=True):
        message = reply.choices[0].message
        if kw.get("tool_choice") == "required":
            _validate_calls([(c.function.name, c.function.arguments) for c in message.tool_calls or []])
        elif "response_format" in kw:
            jsonschema.validate(json.loads(message.content), ANSWER)
        else:
            assert all(c.function.name in SCHEMAS for c in message.tool_calls or [])
