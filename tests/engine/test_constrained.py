"""Constrained decoding in the serving runtime: whatever a random model wants, the grammar decides the shape.

A tiny random Llama with the SmolLM2 tokenizer (:func:`citi_engine.testing.make_tiny_model_dir`) samples at
high temperature, so without the grammar its text is noise; every constrained reply must still parse and
validate. Schemas are bounded (``maxLength``, enums, ``additionalProperties: false``) so a reply ends in a
few dozen tokens. Nothing here asserts on the exact text the model writes.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

pytest.importorskip("llguidance")

from citi_engine.constrained import GrammarError, json_grammar, reply_grammar, tool_call_grammar  # noqa: E402
from citi_engine.data.chat_format import format_tool_calls, parse_tool_calls  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
STOCK = {"type": "function", "function": {"name": "get_stock_price", "parameters": {
    "type": "object", "properties": {"ticker": {"type": "string", "maxLength": 5},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 30}},
    "required": ["ticker"], "additionalProperties": False}}}
TOOLS = [WEATHER, STOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10},
                                           "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                                           "sources": {"type": "array", "items": {"type": "integer", "maximum": 9,
                                                                                  "minimum": 0}, "maxItems": 2}},
          "required": ["answer", "confidence"], "additionalProperties": False}
LOOKBEHIND = {"type": "object", "properties": {"code": {"type": "string", "pattern": "(?<=x)a"}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from citi_engine.testing import make_tiny_model_dir

    torch.set_num_threads(1)
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def prompt(tokenizer, text="What is the weather in Paris?", tools=TOOLS):
    from citi_engine.generate import encode_prompt

    return encode_prompt(tokenizer, [{"role": "user", "content": text}], tools)


def run(model, tokenizer, requests):
    from citi_engine.serving import generate

    generate(model, tokenizer, requests)
    return requests


def request(ids, grammar=None, *, seed=None, temperature=1.5, max_new_tokens=80, prefix=None):
    from citi_engine.serving import GenerationRequest

    return GenerationRequest(prompt_ids=ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             grammar=grammar, prefix_options=[prefix] if prefix else [])


def assert_valid_calls(text: str, names=SCHEMAS) -> list[dict]:
    content, calls = parse_tool_calls(text)
    assert calls and content is None, text
    for call in calls:
        fn = call["function"]
        assert fn["name"] in names
        jsonschema.validate(json.loads(fn["arguments"]), names[fn["name"]])
    return calls


def test_required_tool_choice_gives_valid_calls_from_a_random_model_sampling_hot(tiny):
    model, tok = tiny
    grammar = reply_grammar(tok, tools=TOOLS, tool_choice="required", parallel=False)
    reqs = run(model, tok, [request(prompt(tok), grammar, seed=s) for s in range(6)])
    for r in reqs:
        assert r.finish_reason == "stop", r.text
        assert len(assert_valid_calls(r.text)) == 1


def test_a_call_is_spelt_as_training_spells_it(tiny):
    """The constrained text is exactly what format_tool_calls writes for the call it holds."""
    model, tok = tiny
    grammar = reply_grammar(tok, tools=TOOLS, tool_choice="required", parallel=False)
    for r in run(model, tok, [request(prompt(tok), grammar, seed=s) for s in range(3)]):
        _, calls = parse_tool_calls(r.text)
        assert format_tool_calls(calls) == r.text


def test_named_function_with_forced_prefix_is_the_only_one_called(tiny):
    model, tok = tiny
    grammar = reply_grammar(tok, tools=TOOLS, tool_choice="named", function="get_stock_price")
    prefix = tok('<tool_call>{"name": "get_stock_price", "arguments":', add_special_tokens=False)["input_ids"]
    reqs = run(model, tok, [request(prompt(tok), grammar, seed=s, prefix=prefix, max_new_tokens=120)
                            for s in range(4)])
    for r in reqs:
        closed = r.text[: r.text.rfind("</tool_call>") + len("</tool_call>")]  # a cut last call may trail
        calls = assert_valid_calls(closed, {"get_stock_price": SCHEMAS["get_stock_price"]})
        assert all(c["function"]["name"] == "get_stock_price" for c in calls)


def test_json_schema_reply_parses_and_validates(tiny):
    model, tok = tiny
    grammar = reply_grammar(tok, response_format="json_schema", schema=ANSWER)
    for r in run(model, tok, [request(prompt(tok, "Answer in JSON.", None), grammar, seed=s) for s in range(5)]):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), ANSWER)


def test_rows_of_one_batch_keep_their_own_grammar_or_none(tiny):
    """Greedy: a free row in a batch with constrained rows writes what it writes alone; each constrained row
    follows its own grammar."""
    model, tok = tiny
    ids = prompt(tok)
    alone = run(model, tok, [request(ids, temperature=0.0, max_new_tokens=20)])[0]
    calls = reply_grammar(tok, tools=TOOLS, tool_choice="required", parallel=False)
    answer = reply_grammar(tok, response_format="json_schema", schema=ANSWER)
    free, call_row, json_row = run(model, tok, [request(ids, temperature=0.0, max_new_tokens=20),
                                                request(ids, calls, temperature=0.0),
                                                request(ids, answer, temperature=0.0)])
    assert free.text == alone.text
    assert_valid_calls(call_row.text)
    jsonschema.validate(json.loads(json_row.text), ANSWER)


def test_json_object_reply_is_an_object(tiny):
    model, tok = tiny
    grammar = reply_grammar(tok, response_format="json_object")
    for r in run(model, tok, [request(prompt(tok, "JSON please.", None), grammar, seed=s, max_new_tokens=400)
                              for s in range(2)]):
        if r.finish_reason == "stop":  # any object: a random model may write a long one
            assert isinstance(json.loads(r.text), dict)
        else:
            assert r.text.startswith("{")


def test_free_text_and_auto_without_response_format_have_no_grammar(tiny):
    _, tok = tiny
    assert reply_grammar(tok, tools=TOOLS, tool_choice="auto") is None
    assert reply_grammar(tok, response_format="text") is None


def test_uncompilable_schemas_name_their_param(tiny):
    _, tok = tiny
    with pytest.raises(GrammarError) as err:
        reply_grammar(tok, response_format="json_schema", schema=LOOKBEHIND)
    assert (err.value.code, err.value.param) == ("invalid_response_format", "response_format.json_schema.schema")
    broken = {"type": "function", "function": {"name": "lookup", "parameters": LOOKBEHIND}}
    with pytest.raises(GrammarError) as err:
        reply_grammar(tok, tools=[WEATHER, broken], tool_choice="required")
    assert (err.value.code, err.value.param) == ("invalid_tool_schema", "tools[1].function.parameters")
    # Not offered under a named choice of another function: not compiled, so not refused.
    assert reply_grammar(tok, tools=[WEATHER, broken], tool_choice="named", function="get_weather") is not None


def test_grammar_texts_are_plain_lark_with_json_rules():
    assert json_grammar(ANSWER).startswith("start: %json {")
    text = tool_call_grammar(TOOLS, parallel=False)
    assert "calls: call\n" in text + "\n" and '"get_stock_price' in text


def test_text_or_calls_grammar_refuses_undefined_functions_and_invalid_arguments(tiny):
    """What ``citi eval --constrained`` enforces, checked on the tokens of whole replies."""
    from citi_engine.constrained import compile_grammar, text_or_calls_grammar

    _, tok = tiny
    grammar = compile_grammar(text_or_calls_grammar(TOOLS), tok)

    def follows(text: str) -> bool:
        matcher = grammar.matcher()
        return matcher.accept_all(tok(text, add_special_tokens=False)["input_ids"]) and matcher.accepting

    assert follows("It is sunny, no call needed.")
    assert follows('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>')
    assert not follows('<tool_call>{"name": "rm_rf", "arguments": {"path": "/"}}</tool_call>')
    assert not follows('<tool_call>{"name": "get_weather", "arguments": {"city": 5, "unit": "celsius"}}</tool_call>')
    assert not follows('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')  # unit
    assert not follows('Sure: <tool_call>{"name": "get_stock_price", "arguments": {"ticker": "AAPL"}}</tool_call>')


def test_constrained_tool_eval_scores_every_case_and_says_so(tiny):
    from citi_engine.evaluate import cases_from_dicts, evaluate_tool_calls

    model, tok = tiny
    ask = [{"role": "user", "content": "Weather in Paris, in celsius?"}]
    cases = cases_from_dicts([
        {"messages": ask, "tools": TOOLS, "ground_truth": [{"get_weather": {"city": ["Paris"], "unit": ["celsius"]}}]},
        {"messages": [{"role": "user", "content": "Say hi."}], "tools": TOOLS, "ground_truth": []},
    ])
    free = evaluate_tool_calls(model, tok, cases, batch_size=2, max_new_tokens=24)
    held = evaluate_tool_calls(model, tok, cases, batch_size=2, max_new_tokens=24, constrained=True)
    assert (free.constrained, held.constrained) == (False, True)
    assert held.n == free.n == 2 and held.unconstrained == 0
    assert "unparseable" not in held.failure_counts


def test_grammar_reads_byte_level_tokens_whatever_decoder_chain_describes_them(tiny):
    """transformers 5.17 describes the GGUF tokenizer's decoder as a chain; llguidance must still see bytes."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    from citi_engine.constrained import _ll_tokenizer

    _, tokenizer = tiny
    chained = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chained.backend_tokenizer.decoder = decoders.Sequence([
        decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "), decoders.ByteLevel()])
    plain, chain = _ll_tokenizer(tokenizer), _ll_tokenizer(chained)
    ids = list(range(len(tokenizer)))
    assert [chain.decode_bytes([i]) for i in ids] == [plain.decode_bytes([i]) for i in ids]
    space_quote = tokenizer.convert_tokens_to_ids('\u0120"')
    assert chain.decode_bytes([space_quote]) == b' "'
