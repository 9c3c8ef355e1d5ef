"""generate_chat on a tiny real Llama with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from citi_engine.errors import Cancelled
from citi_engine.generate import (
    generate_chat,
    generate_ids,
    pad_left,
    prefill,
    prefill_chunk_for,
    stop_token_ids,
)
from citi_engine.models import load_model
from citi_engine.testing import make_tiny_model_dir, vary_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Write a long story about a dragon who learns to cook soup."}]},
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER]},
    {"messages": [{"role": "user", "content": "2+2?"}]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = load_model(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")), device="cpu")
    vary_weights(model)
    return model, tok


class ForcedTokens:
    """A logit bias on the real model's lm_head: at forward call k, token ``script[k]`` wins (None: no bias)."""

    def __init__(self, model, script):
        self.script, self.calls = list(script), 0
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        k, self.calls = self.calls, self.calls + 1
        if k < len(self.script) and self.script[k] is not None:
            output = output.clone()
            output[..., self.script[k]] += 1e4
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_batched_greedy_equals_one_by_one(tiny):
    model, tok = tiny
    batched = generate_chat(model, tok, CONVERSATIONS, max_new_tokens=8, batch_size=4)
    alone = [generate_chat(model, tok, [c], max_new_tokens=8)[0] for c in CONVERSATIONS]
    assert [g.completion_ids for g in batched] == [g.completion_ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert len({g.text for g in batched}) > 1  # the prompts matter: not one degenerate answer
    lengths = {g.prompt_tokens for g in batched}
    assert len(lengths) == len(CONVERSATIONS)  # really padded
    for g in batched:
        assert g.finish_reason == "length" and g.completion_tokens == 8


def test_batch_size_does_not_change_greedy_replies(tiny):
    model, tok = tiny
    a = generate_chat(model, tok, CONVERSATIONS, max_new_tokens=4, batch_size=3)
    b = generate_chat(model, tok, CONVERSATIONS, max_new_tokens=4, batch_size=1)
    assert [g.text for g in a] == [g.text for g in b]


def test_reply_stops_at_end_of_turn_token(tiny):
    model, tok = tiny
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos in stop_token_ids(model, tok)
    conv = [CONVERSATIONS[1]]
    free = generate_chat(model, tok, conv, max_new_tokens=2)[0]
    with ForcedTokens(model, [None, None, eos]):
        stopped = generate_chat(model, tok, conv, max_new_tokens=20)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens == 3 and stopped.completion_ids[-1] == eos
    assert stopped.text == free.text and "<|im_end|>" not in stopped.text
    assert free.finish_reason == "length"


def test_each_row_of_a_batch_stops_on_its_own(tiny):
    model, tok = tiny
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with ForcedTokens(model, [eos]):  # every row's first token is the end of turn
        out = generate_chat(model, tok, CONVERSATIONS, max_new_tokens=5, batch_size=4)
    assert all(g.text == "" and g.finish_reason == "stop" and g.completion_tokens == 1 for g in out)


def test_tool_call_reply_is_parsed_and_finishes_with_tool_calls(tiny):
    model, tok = tiny
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    script = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    with ForcedTokens(model, script):
        (g,) = generate_chat(model, tok, [CONVERSATIONS[2]], max_new_tokens=64)
    assert g.text == text
    assert g.finish_reason == "tool_calls"
    assert g.content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in g.tool_calls] == \
        [("get_weather", {"city": "Paris"})]


def test_stop_string_cuts_the_reply(tiny):
    model, tok = tiny
    full = generate_chat(model, tok, [CONVERSATIONS[1]], max_new_tokens=12)[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = generate_chat(model, tok, [CONVERSATIONS[1]], max_new_tokens=12, stop=[stop])[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=6, temperature=1.5, top_p=0.95)
    a = generate_chat(model, tok, CONVERSATIONS[:2], seed=7, **kw)
    b = generate_chat(model, tok, CONVERSATIONS[:2], seed=7, **kw)
    c = generate_chat(model, tok, CONVERSATIONS[:2], seed=8, **kw)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]


def test_cancel_flag_raises_cancelled(tiny):
    model, tok = tiny
    with pytest.raises(Cancelled):
        generate_chat(model, tok, CONVERSATIONS, max_new_tokens=4, batch_size=1, should_cancel=lambda: True)


def test_training_mode_is_restored(tiny):
    model, tok = tiny
    model.train()
    try:
        generate_chat(model, tok, CONVERSATIONS[:1], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def long_prompts(lengths, seed=1):
    """Token-id prompts of the given lengths (random ids of the real vocabulary, no template)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 40000, (n,), generator=g).tolist() for n in lengths]


LENGTHS = (150, 97, 33, 181, 64)  # left-padded to 181 columns in one batch


@pytest.mark.parametrize("chunk", [16, 37, 181, 500])
def test_chunked_prefill_gives_the_greedy_replies_of_one_shot_prefill(tiny, chunk):
    model, tok = tiny
    prompts = long_prompts(LENGTHS)
    one_shot = generate_ids(model, tok, prompts, max_new_tokens=6, batch_size=5, prefill_chunk=0, parse=False)
    chunked = generate_ids(model, tok, prompts, max_new_tokens=6, batch_size=5, prefill_chunk=chunk, parse=False)
    assert [g.completion_ids for g in chunked] == [g.completion_ids for g in one_shot]
    assert len({tuple(g.completion_ids) for g in one_shot}) == len(prompts)  # prompt-dependent, not degenerate


def test_chunked_prefill_gives_the_logits_and_cache_of_one_shot_with_and_without_padding(tiny):
    model, _ = tiny
    for lengths in ((120, 120, 120), LENGTHS):  # without padding the first chunk runs on the causal fast path
        ids, mask = pad_left(long_prompts(lengths, seed=2), 0, "cpu")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            want, want_cache = prefill(model, ids, mask, positions, chunk=0)
            got, got_cache = prefill(model, ids, mask, positions, chunk=25)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got_cache.get_seq_length() == want_cache.get_seq_length() == ids.shape[1]


def test_chunked_prefill_feeds_at_most_a_chunk_and_asks_for_one_position_of_logits(tiny):
    model, tok = tiny
    queries, logits = [], []
    attn = model.model.layers[0].self_attn
    handles = [
        attn.register_forward_hook(lambda m, args, out: queries.append(out[0].shape[1])),
        model.lm_head.register_forward_hook(lambda m, args, out: logits.append(tuple(out.shape))),
    ]
    try:
        generate_ids(model, tok, long_prompts(LENGTHS), max_new_tokens=3, batch_size=5, prefill_chunk=40,
                     parse=False)
    finally:
        for h in handles:
            h.remove()
    assert queries == [40, 40, 40, 40, 21, 1, 1]  # 181 columns in chunks of 40, then one column per new token
    assert logits == [(5, 1, model.config.vocab_size)] * len(queries)  # never batch x prompt x vocabulary


def test_default_prefill_chunk_keeps_one_forward_under_the_token_budget():
    assert prefill_chunk_for(1) == 8192 and prefill_chunk_for(64) == 128 and prefill_chunk_for(128) == 64
    assert prefill_chunk_for(1000) == 32  # a floor: shorter chunks would only add forwards


def test_negative_prefill_chunk_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate_ids(model, tok, long_prompts((10,)), max_new_tokens=2, prefill_chunk=-1)


def test_a_batch_out_of_device_memory_is_generated_again_in_halves(tiny, monkeypatch, caplog):
    """Fault injection: the model's forward raises out-of-memory for more than two rows (as a GPU would for a
    batch too large for it); the replies are those of batches of two, and the fallback says so in the log."""
    import functools

    model, tok = tiny
    prompts = long_prompts((40, 33, 27, 21, 18))
    want = generate_ids(model, tok, prompts, max_new_tokens=5, batch_size=2, parse=False)
    forward = model.forward

    @functools.wraps(forward)
    def small_batches_only(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("injected: too many rows")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", small_batches_only)
    with caplog.at_level("WARNING", logger="citi.generate"):
        got = generate_ids(model, tok, prompts, max_new_tokens=5, batch_size=5, parse=False)
    assert [g.completion_ids for g in got] == [g.completion_ids for g in want]
    assert "out of memory generating 5 replies at once" in caplog.text


def test_one_row_out_of_device_memory_is_an_error_not_a_retry(tiny, monkeypatch):
    model, tok = tiny

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(model, "forward", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        generate_ids(model, tok, long_prompts((12,)), max_new_tokens=2, batch_size=4, parse=False)


def test_call_margin_is_positive_exactly_when_greedy_decoding_opens_a_call(tiny):
    """A bias on the lm_head puts the first token of <tool_call> near the top for some prompts, not for others;
    the margin's sign must say which replies greedy decoding opens with it."""
    from citi_engine.data.chat_format import call_open_tokens
    from citi_engine.evaluate.tool_eval import call_margins, cases_from_dicts

    model, tok = tiny
    opening = list(call_open_tokens(tok))
    cases = cases_from_dicts([{"messages": c["messages"], "tools": c.get("tools") or [], "category": "irrelevance",
                               "ground_truth": []} for c in CONVERSATIONS])
    plain = call_margins(model, tok, cases)
    low = sorted(plain)
    bias = -(low[0] + low[1]) / 2  # the lowest margin ends below 0, the others above, each by half a gap

    def push(module, inputs, output):
        output[..., opening] += bias
        return output

    handle = model.lm_head.register_forward_hook(push)
    try:
        margins = call_margins(model, tok, cases)
        replies = generate_chat(model, tok, [c.conversation() for c in cases], max_new_tokens=1, batch_size=2)
    finally:
        handle.remove()
    assert margins == pytest.approx([m + bias for m in plain], abs=1e-3)
    opens = [r.completion_ids[0] in opening for r in replies]
    assert opens == [m > 0 for m in margins] and any(opens) and not all(opens)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_call_threshold_holds_back_exactly_the_calls_whose_margin_is_below_it(tiny, decode):
    """Served with a threshold t (a bias of -t on the tokens that open a call while the reply is empty), a reply
    opens with a call exactly when its margin is above t; a forced prefix is left alone."""
    from citi_engine.data.chat_format import call_open_tokens
    from citi_engine.evaluate.tool_eval import call_margins, cases_from_dicts
    from citi_engine.generate import encode_prompt
    from citi_engine.serving import GenerationRequest, generate

    model, tok = tiny
    opening = call_open_tokens(tok)
    first = opening[0]
    cases = cases_from_dicts([{"messages": c["messages"], "tools": c.get("tools") or [], "category": "irrelevance",
                               "ground_truth": []} for c in CONVERSATIONS])
    plain = call_margins(model, tok, cases)
    bias = 1.0 - min(plain)  # every reply opens with a call now, the weakest by a margin of 1

    def push(module, inputs, output):
        output[..., list(opening)] += bias
        return output

    handle = model.lm_head.register_forward_hook(push)
    try:
        margins = call_margins(model, tok, cases)
        ranked = sorted(margins)
        t = (ranked[1] + ranked[2]) / 2  # two margins below, two above
        reqs = [GenerationRequest(prompt_ids=encode_prompt(tok, c.messages, c.tools), max_new_tokens=2,
                                  opening_bias={o: -t for o in opening}) for c in cases]
        forced = [GenerationRequest(prompt_ids=encode_prompt(tok, cases[0].messages), max_new_tokens=3,
                                    prefix_options=[[first]], opening_bias=b) for b in ({first: -1e4}, {})]
        generate(model, tok, [*reqs, *forced], decode=decode)
    finally:
        handle.remove()
    opens = [r.text.lstrip().startswith("<") for r in reqs]
    assert opens == [m > t for m in margins] and sum(opens) == 2
    assert forced[0].text == forced[1].text  # the bias does not reach past a forced prefix


def test_tool_eval_through_a_static_cache_gives_the_replies_of_the_dynamic_one(tiny):
    """`decode="static"` (the CUDA-graph path's cache, eager on CPU) answers every case as the dynamic cache does,
    reply for reply; the fingerprints differ between cases, so the comparison can fail."""
    from citi_engine.evaluate.tool_eval import cases_from_dicts, evaluate_tool_calls

    model, tok = tiny
    cases = cases_from_dicts([{"messages": c["messages"], "tools": c.get("tools") or [], "category": "irrelevance",
                               "ground_truth": []} for c in CONVERSATIONS])
    dynamic = evaluate_tool_calls(model, tok, cases, batch_size=3, max_new_tokens=12)
    static = evaluate_tool_calls(model, tok, cases, batch_size=3, max_new_tokens=12, decode="static")
    assert [o["reply_hash"] for o in static.outcomes] == [o["reply_hash"] for o in dynamic.outcomes]
    assert len({o["reply_hash"] for o in dynamic.outcomes}) > 1


@pytest.mark.parametrize("decode", ["static", "cuda_graphs"])
def test_a_static_cache_generates_the_tokens_of_the_dynamic_one(tiny, decode):
    """Prompts of several lengths in two batches with chunked prefill, and chat replies: every greedy reply the
    same, token for token (cuda_graphs runs the static path eagerly where there is no GPU). Sampled replies are not
    compared: the two caches sum in different orders, and a draw near a boundary of the distribution may fall
    the other way."""
    model, tok = tiny
    prompts = long_prompts(LENGTHS)
    kw = dict(max_new_tokens=8, batch_size=3, prefill_chunk=37, parse=False)
    dynamic = generate_ids(model, tok, prompts, **kw)
    static = generate_ids(model, tok, prompts, decode=decode, **kw)
    assert [g.completion_ids for g in static] == [g.completion_ids for g in dynamic]
    assert len({tuple(g.completion_ids) for g in dynamic}) == len(prompts)
    chats = generate_chat(model, tok, CONVERSATIONS, max_new_tokens=12, batch_size=4)
    assert [g.text for g in generate_chat(model, tok, CONVERSATIONS, max_new_tokens=12, batch_size=4,
                                          decode=decode)] == [g.text for g in chats]


def test_an_unknown_decode_loop_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="decode must be one of"):
        generate_ids(model, tok, [[5, 6, 7]], max_new_tokens=2, decode="graphs")
