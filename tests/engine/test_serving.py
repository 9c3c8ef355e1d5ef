"""The serving runtime on its own (no server): a saved CITI adapter read into modules over a shared base gives
the logits of peft, and batched serving generation gives generate_chat's greedy text, streamed in deltas."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from citi_engine import testing  # noqa: E402
from citi_engine.adapter import apply_method, save_adapter  # noqa: E402
from citi_engine.generate import encode_prompt, generate_chat  # noqa: E402
from citi_engine.models import load_model  # noqa: E402
from citi_engine.molora import FrozenMoloraLinear  # noqa: E402
from citi_engine.molora.layer import molora_mix  # noqa: E402
from citi_engine.serving import GenerationRequest, generate, read_adapter_modules, swap_modules  # noqa: E402

MOLORA = ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj"]
UCO = ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Write a long story about a dragon who learns to cook soup."}]},
    {"messages": [{"role": "user", "content": "2+2?"}]},
]


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_citi_adapter_read_into_modules_on_a_shared_base_gives_the_logits_of_peft(tmp_path, gate):
    base = testing.tiny_llama(seed=0, pad_token_id=0)
    served = copy.deepcopy(base)
    peft_model = apply_method(base, "citi", molora=MOLORA, uco=UCO, num_experts=3, rank=4, alpha=8.0, gate=gate)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".molora_B." in name or ".molora_router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(peft_model, tmp_path / "adapter", {"model": "tiny"})

    linears = {n: m for n, m in served.named_modules() if isinstance(m, torch.nn.Linear)}
    kind, modules = read_adapter_modules(tmp_path / "adapter", linears)
    assert kind == "citi" and set(modules) == set(MOLORA) | set(UCO)
    assert all(isinstance(modules[n], FrozenMoloraLinear) and modules[n].base is linears[n] for n in MOLORA)
    assert {modules[n].gate for n in MOLORA} == {gate}  # saved with the adapter, read back by the server
    ids = torch.randint(1, 96, (2, 7), generator=g)
    with torch.no_grad():
        before = served(input_ids=ids).logits
        swap_modules(served, modules)
        got, want = served(input_ids=ids).logits, peft_model(input_ids=ids).logits
        swap_modules(served, {n: linears[n] for n in modules})
        assert torch.equal(served(input_ids=ids).logits, before), "swapping back restores the base bit for bit"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-3


def test_components_reading_one_input_share_one_router_matmul_and_give_the_same_logits(tmp_path, monkeypatch):
    """SHARED_INPUT_GROUPS: q, k, v of a layer (and gate, up) take their router-and-A products from one matmul; the
    logits are those of each component computing its own, and nothing is held once a forward is done."""
    from citi_engine.molora import layer as molora_layer

    molora = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
              "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj",
              "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    base = testing.tiny_llama(seed=0, pad_token_id=0)
    served = copy.deepcopy(base)
    peft_model = apply_method(base, "citi", molora=molora, uco=[], num_experts=3, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".molora_B." in name or ".molora_router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(peft_model, tmp_path / "adapter", {"model": "tiny"})
    linears = {n: m for n, m in served.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.randint(1, 96, (2, 7), generator=g)

    _, alone = read_adapter_modules(tmp_path / "adapter", linears)
    assert all(m.shared_input is None for m in alone.values())  # off by default
    monkeypatch.setattr(molora_layer, "SHARED_INPUT_GROUPS", True)
    _, grouped = read_adapter_modules(tmp_path / "adapter", linears)
    groups = {id(m.shared_input): sorted(n.rsplit(".", 1)[1] for n, m2 in grouped.items() if m2.shared_input is m.shared_input)
              for m in grouped.values() if m.shared_input is not None}
    # layer 0's q, k, v and gate, up; layer 1's q and up read different inputs, down has no sibling
    assert sorted(groups.values()) == [["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"]]
    calls = []
    monkeypatch.setattr(molora_layer, "molora_mix", lambda *a, **k: calls.append(1) or molora_mix(*a, **k))
    with torch.no_grad():
        swap_modules(served, alone)
        want = served(input_ids=ids).logits
        n_alone, calls[:] = len(calls), []
        swap_modules(served, grouped)
        got = served(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n_alone == 8 and len(calls) == 5  # gates computed once per group: 2 groups + 3 on their own
    assert all(m.shared_input._mixed is None for m in grouped.values() if m.shared_input is not None)
    with torch.inference_mode():  # as the server generates: its tensors keep no version counter
        torch.testing.assert_close(served(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = load_model(testing.make_tiny_model_dir(tmp_path_factory.mktemp("tiny")), device="cpu")
    testing.vary_weights(model)
    return model, tok


def test_batched_serving_gives_generate_chats_greedy_text_in_streamed_deltas(tiny):
    model, tok = tiny
    expected = generate_chat(model, tok, CONVERSATIONS, max_new_tokens=12, batch_size=1)
    deltas: list[list[str]] = [[] for _ in CONVERSATIONS]
    reqs = [GenerationRequest(prompt_ids=encode_prompt(tok, c["messages"]), max_new_tokens=12,
                              on_text=deltas[i].append) for i, c in enumerate(CONVERSATIONS)]
    generate(model, tok, reqs)  # one batch of prompts of different lengths
    assert [r.text for r in reqs] == [g.text for g in expected]
    assert [r.completion_tokens for r in reqs] == [g.completion_tokens for g in expected]
    assert ["".join(d) for d in deltas] == [r.text for r in reqs]
    assert any(len(d) > 1 for d in deltas), "text arrives as it is generated"
    assert not torch.is_inference_mode_enabled()


def test_serving_prefill_in_chunks_gives_the_greedy_replies_of_one_shot_prefill(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 40000, (n,), generator=g).tolist() for n in (140, 61, 118)]  # left-padded to 140
    replies = {}
    for chunk in (0, 24):
        reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=6, ignore_eos=True) for p in prompts]
        generate(model, tok, reqs, prefill_chunk=chunk)
        replies[chunk] = [(r.text, r.completion_tokens) for r in reqs]
    assert replies[24] == replies[0]
    assert len({text for text, _ in replies[0]}) == len(prompts)


def _static_requests(tok, deltas=None):
    """Requests that end at different steps: different budgets, a stop string, end-of-turn allowed or not."""
    prompts = [encode_prompt(tok, c["messages"]) for c in CONVERSATIONS]
    settings = [dict(max_new_tokens=12), dict(max_new_tokens=5, ignore_eos=True), dict(max_new_tokens=9, stop=["e"])]
    return [GenerationRequest(prompt_ids=p, on_text=None if deltas is None else deltas[i].append, **kw)
            for i, (p, kw) in enumerate(zip(prompts, settings, strict=True))]


@pytest.mark.parametrize("decode", ["static", "cuda_graphs"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_static_kv_cache_decoding_gives_the_replies_of_the_dynamic_cache(tiny, decode, chunk):
    """On CPU ``cuda_graphs`` runs the same static steps eagerly; rows finish at different steps and stay."""
    model, tok = tiny
    want = _static_requests(tok)
    generate(model, tok, want, prefill_chunk=chunk)
    deltas: list[list[str]] = [[] for _ in want]
    got = _static_requests(tok, deltas)
    generate(model, tok, got, prefill_chunk=chunk, decode=decode)
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in got] == \
        [(r.text, r.completion_tokens, r.finish_reason) for r in want]
    assert len({r.completion_tokens for r in got}) > 1, "the rows ended at different steps"
    assert ["".join(d) for d in deltas] == [r.text for r in got]


def test_compiled_static_decoding_gives_the_replies_of_the_dynamic_cache(tiny, caplog):
    """``compiled_graphs``: the decode step goes through torch.compile (on CPU without graphs); rows that end at
    different steps, stop strings and streamed text as with the dynamic cache, and nothing fell back."""
    model, tok = tiny
    want = _static_requests(tok)
    generate(model, tok, want)
    deltas: list[list[str]] = [[] for _ in want]
    got = _static_requests(tok, deltas)
    with caplog.at_level("WARNING", logger="citi.static_decode"):
        generate(model, tok, got, decode="compiled_graphs")
    assert not [r for r in caplog.records if "torch.compile" in r.getMessage()]
    from citi_engine import static_decode

    assert static_decode._COMPILED_STEP is not None
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in got] == \
        [(r.text, r.completion_tokens, r.finish_reason) for r in want]
    assert ["".join(d) for d in deltas] == [r.text for r in got]


def test_static_decoding_keeps_a_grammar_row_beside_free_rows(tiny):
    pytest.importorskip("llguidance")
    from citi_engine.constrained import compile_grammar, json_grammar

    model, tok = tiny
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    outcomes = {}
    for decode in ("dynamic", "static"):
        reqs = _static_requests(tok)
        reqs[1].grammar = compile_grammar(json_grammar(schema), tok)
        reqs[1].max_new_tokens, reqs[1].ignore_eos = 24, False
        generate(model, tok, reqs, decode=decode)
        outcomes[decode] = [(r.text, r.finish_reason) for r in reqs]
    assert outcomes["static"] == outcomes["dynamic"]
    import json

    assert set(json.loads(outcomes["static"][1][0])) == {"a"}


def test_static_decoding_hands_each_step_to_the_device_before_the_hosts_bookkeeping(tiny, monkeypatch):
    """The next step is launched before the tokens that feed it are checked and streamed (the GPU works while the
    host does), and no step is launched once every row surely ends: a reply of 5 tokens takes 4 steps."""
    from citi_engine import serving
    from citi_engine.static_decode import StaticDecoder

    model, tok = tiny
    events: list[str] = []
    step, advance = StaticDecoder.step, serving._advance

    def logged_step(self, tokens):
        events.append("step")
        return step(self, tokens)

    def logged_advance(row, token, eos, now):
        events.append("advance")
        return advance(row, token, eos, now)

    monkeypatch.setattr(StaticDecoder, "step", logged_step)
    monkeypatch.setattr(serving, "_advance", logged_advance)
    reqs = [GenerationRequest(prompt_ids=encode_prompt(tok, c["messages"]), max_new_tokens=5, ignore_eos=True)
            for c in CONVERSATIONS[:2]]
    generate(model, tok, reqs, decode="static")
    assert events == ["step", "advance", "advance"] * 4 + ["advance", "advance"]
    assert [r.completion_tokens for r in reqs] == [5, 5]


def test_unknown_decode_mode_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(model, tok, _static_requests(tok), decode="fast")


def test_a_reply_grown_a_token_at_a_time_reads_as_a_full_decode_at_every_step():
    # The serving loop keeps each reply's text incrementally; at every step it must equal what decoding all of the
    # reply's ids gives (split multi-byte characters show as U+FFFD there, and ids the tokenizer lacks as nothing).
    import random

    from transformers import AutoTokenizer

    from citi_engine.serving import _Row

    tok = AutoTokenizer.from_pretrained(testing.smollm2_tokenizer_dir())
    rng = random.Random(0)
    written = ["héllo wörld 日本語 🤖 <tool_call>{\"name\": \"f\"}</tool_call>", "emoji 😀😃 中文 <|im_end|> after",
               "plain text,  two spaces\n\nand lines"]
    sequences = [tok.encode(t) for t in written]
    sequences += [[rng.randrange(len(tok) + 500) for _ in range(40)] for _ in range(30)]  # a larger model's ids too
    for ids in sequences:
        row = _Row(GenerationRequest(prompt_ids=[1], max_new_tokens=len(ids)), [], tok, torch.device("cpu"))
        assert row._stream is not None  # the incremental path is the one under test
        for k, token in enumerate(ids):
            row.add(token)
            assert row.text() == tok.decode(ids[:k + 1], skip_special_tokens=False), (ids, k)
