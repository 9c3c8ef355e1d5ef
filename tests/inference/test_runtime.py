"""The inference runtime in process: served adapters compute what peft computes, batching changes no
answer, the LRU cache evicts the least recently used adapter, stop strings, seeds and forced prefixes."""

from __future__ import annotations

import asyncio
import shutil

import torch

from citi_engine.adapter import load_adapter
from citi_engine.components import list_components
from citi_engine.generate import encode_prompt, generate_chat
from citi_engine.molora import FrozenMoloraLinear
from tests.inference.conftest import ASK, GENERAL, WEATHER_TOOL
from worker.inference.cache import (
    BatchScheduler,
    GenerationRequest,
    Generator,
    ModelCache,
    ServedModel,
)

CONVERSATIONS = [
    {"messages": ASK, "tools": [WEATHER_TOOL]},
    {"messages": [{"role": "user", "content": GENERAL[0][0]}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Tell me a long story about a dragon who learns to cook soup."}]},
]


def _logits(model, tok, text: str) -> torch.Tensor:
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_citi_adapter_is_served_as_copies_of_its_modules_with_the_logits_of_peft(varied_model, citi_dir):
    cache = ModelCache(device="cpu")
    served = cache.adapter("ft:a", citi_dir)
    reference, tok = load_adapter(citi_dir, device="cpu")
    text = "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    base_before = _logits(served.base.model, tok, text)

    job_components = reference.peft_config["default"]
    assert served.adapter.kind == "citi"
    assert set(served.adapter.modules) == set(job_components.target_modules) | set(job_components.modules_to_save)
    for name in job_components.modules_to_save:  # UCO: the adapter's own full copy, the base layer untouched
        copy, original = served.adapter.modules[name], served.base.model.get_submodule(name)
        assert type(copy) is torch.nn.Linear and copy.weight.data_ptr() != original.weight.data_ptr()
        assert not torch.equal(copy.weight, original.weight)
    for name in job_components.target_modules:  # MOLoRA: unmerged, over the shared base layer
        module = served.adapter.modules[name]
        assert isinstance(module, FrozenMoloraLinear)
        assert module.base is served.base.model.get_submodule(name)

    cache.activate(served)
    adapted = _logits(served.base.model, tok, text)
    expected = _logits(reference, tok, text)
    assert torch.allclose(adapted, expected, atol=1e-5), (adapted - expected).abs().max()
    assert not torch.allclose(adapted, base_before, atol=1e-3), "the adapter changes the output"

    cache.activate(ServedModel(base=served.base))  # back to the plain base: bit for bit what it was
    assert torch.equal(_logits(served.base.model, tok, text), base_before)


def test_lora_adapter_is_served_unmerged_with_the_logits_of_peft(lora_dir):
    cache = ModelCache(device="cpu")
    served = cache.adapter("ft:lora", lora_dir)
    reference, tok = load_adapter(lora_dir, device="cpu")
    assert served.adapter.kind == "lora" and len(served.adapter.modules) == len(list_components(served.base.model))
    cache.activate(served)
    text = "Hello there, how are you?"
    assert torch.allclose(_logits(served.base.model, tok, text), _logits(reference, tok, text), atol=1e-5)


def test_adapters_of_one_base_share_it_and_load_right_while_another_is_swapped_in(citi_dir, lora_dir):
    cache = ModelCache(device="cpu")
    a = cache.adapter("ft:a", citi_dir)
    cache.activate(a)  # a's UCO copies and MOLoRA layers now sit in the base model
    b = cache.adapter("ft:lora", lora_dir)  # loading b must wrap the base's own layers, not a's
    assert a.base is b.base and cache.loaded_bases() == [a.base.spec]
    for name, module in b.adapter.modules.items():
        assert module.base is a.base.linears[name]
    reference, tok = load_adapter(lora_dir, device="cpu")
    cache.activate(b)
    text = "What is the weather in Paris?"
    assert torch.allclose(_logits(b.base.model, tok, text), _logits(reference, tok, text), atol=1e-5)


def test_lru_cache_evicts_the_least_recently_used_adapter(tmp_path, citi_dir):
    cache = ModelCache(device="cpu", adapter_cache_size=2)
    dirs = {}
    for name in ("a", "b", "c"):
        dirs[name] = tmp_path / name
        shutil.copytree(citi_dir, dirs[name])
    first = cache.adapter("a", dirs["a"])
    cache.adapter("b", dirs["b"])
    assert cache.cached_adapters() == ["a", "b"]
    assert cache.adapter("a", dirs["a"]).adapter is first.adapter  # a hit, and now the most recently used
    cache.adapter("c", dirs["c"])
    assert cache.cached_adapters() == ["a", "c"], "b was the least recently used"
    again = cache.adapter("b", dirs["b"])
    assert cache.cached_adapters() == ["c", "b"]
    assert again.adapter is not None and again.adapter.load_seconds > 0  # loaded anew from its files

    # An evicted adapter still serves the requests that hold it.
    req = GenerationRequest(prompt_ids=encode_prompt(first.tokenizer, ASK), max_new_tokens=4)
    Generator(cache).run(first, [req])
    assert req.finish_reason in ("stop", "length") and req.completion_tokens >= 1


def test_batched_generation_gives_the_same_greedy_text_as_generate_chat(varied_model):
    cache = ModelCache(device="cpu")
    base = cache.base(varied_model)
    expected = generate_chat(base.model, base.tokenizer, CONVERSATIONS, max_new_tokens=12, batch_size=1)
    reqs = [GenerationRequest(prompt_ids=encode_prompt(base.tokenizer, c["messages"], c.get("tools")), max_new_tokens=12)
            for c in CONVERSATIONS]
    Generator(cache).run(ServedModel(base=base), reqs)  # one batch of three prompts of different lengths
    assert [r.text for r in reqs] == [g.text for g in expected]
    assert [r.completion_tokens for r in reqs] == [g.completion_tokens for g in expected]
    assert [r.finish_reason for r in reqs] == ["length" if g.finish_reason == "length" else "stop" for g in expected]
    assert len({r.text for r in reqs}) == 3, "the prompts get different answers"


def test_scheduler_batches_concurrent_requests_by_adapter_without_changing_answers(varied_model, citi_dir):
    cache = ModelCache(device="cpu")
    base = ServedModel(base=cache.base(varied_model))
    adapted = cache.adapter("ft:a", citi_dir)
    tok = base.tokenizer
    prompts = [encode_prompt(tok, c["messages"], c.get("tools")) for c in CONVERSATIONS]

    def requests():
        return [GenerationRequest(prompt_ids=p, max_new_tokens=8) for p in prompts]

    alone = {}
    for name, served in (("base", base), ("citi", adapted)):
        alone[name] = []
        for req in requests():
            Generator(cache).run(served, [req])
            alone[name].append(req.text)

    async def together():
        scheduler = BatchScheduler(cache, max_batch_size=16, max_wait_ms=20)
        try:
            base_reqs, citi_reqs = requests(), requests()
            await asyncio.gather(*(scheduler.submit(base, r) for r in base_reqs),
                                 *(scheduler.submit(adapted, r) for r in citi_reqs))
            return scheduler, base_reqs, citi_reqs
        finally:
            await scheduler.close()

    scheduler, base_reqs, citi_reqs = asyncio.run(together())
    assert scheduler.batches_run == 2 and scheduler.batch_sizes == [3, 3], "one batch per adapter"
    assert [r.text for r in base_reqs] == alone["base"]
    assert [r.text for r in citi_reqs] == alone["citi"]
    assert alone["base"] != alone["citi"]


def test_batch_size_limit_splits_a_group(varied_model):
    cache = ModelCache(device="cpu")
    base = ServedModel(base=cache.base(varied_model))
    prompt = encode_prompt(base.tokenizer, ASK)

    async def run():
        scheduler = BatchScheduler(cache, max_batch_size=2, max_wait_ms=20)
        try:
            await asyncio.gather(*(scheduler.submit(base, GenerationRequest(prompt_ids=prompt, max_new_tokens=2))
                                   for _ in range(5)))
            return scheduler.batch_sizes
        finally:
            await scheduler.close()

    assert asyncio.run(run()) == [2, 2, 1]


def test_stop_string_cuts_the_text_and_is_never_streamed(varied_model):
    cache = ModelCache(device="cpu")
    served = ServedModel(base=cache.base(varied_model))
    prompt = encode_prompt(served.tokenizer, CONVERSATIONS[2]["messages"])
    free = GenerationRequest(prompt_ids=prompt, max_new_tokens=16)
    Generator(cache).run(served, [free])
    stop = free.text[6:9]
    assert len(stop) == 3 and stop.strip(), free.text

    deltas: list[str] = []
    cut = GenerationRequest(prompt_ids=prompt, max_new_tokens=16, stop=[stop], on_text=deltas.append)
    Generator(cache).run(served, [cut])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert "".join(deltas) == cut.text and all(stop not in d for d in deltas)


def test_seeded_sampling_is_reproducible_and_a_tiny_top_p_is_greedy(varied_model):
    cache = ModelCache(device="cpu")
    served = ServedModel(base=cache.base(varied_model))
    prompt = encode_prompt(served.tokenizer, CONVERSATIONS[1]["messages"])

    def run(**kw) -> str:
        req = GenerationRequest(prompt_ids=prompt, max_new_tokens=12, **kw)
        Generator(cache).run(served, [req])
        return req.text

    greedy = run()
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    samples = {run(temperature=1.5, seed=s) for s in range(4)}
    assert len(samples) > 1, "different seeds sample different text"
    assert run(temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_forced_prefix_is_the_option_the_model_finds_most_likely(varied_model):
    cache = ModelCache(device="cpu")
    served = ServedModel(base=cache.base(varied_model))
    tok, model = served.tokenizer, served.base.model
    prompt = encode_prompt(tok, ASK, [WEATHER_TOOL])
    options = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ('<tool_call>{"name": "get_weather", "arguments":', '<tool_call>{"name": "lookup", "arguments":',
                "Sure, here you go:")]

    def score(option: list[int]) -> float:  # log-likelihood of the option after the prompt, no padding, no cache
        ids = torch.tensor([prompt + option])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(option))

    best = max(options, key=score)
    deltas: list[str] = []
    req = GenerationRequest(prompt_ids=prompt, max_new_tokens=len(max(options, key=len)) + 4, prefix_options=options,
                            on_text=deltas.append)
    Generator(cache).run(served, [req])
    assert req.prefix_text == tok.decode(best)
    assert req.text.startswith(req.prefix_text) and "".join(deltas) == req.text
    assert req.completion_tokens >= len(best) + 1, "the forced prefix counts as completion tokens"


def test_a_cancelled_request_stops_at_its_next_token(varied_model):
    cache = ModelCache(device="cpu")
    served = ServedModel(base=cache.base(varied_model))
    prompt = encode_prompt(served.tokenizer, ASK)
    req = GenerationRequest(prompt_ids=prompt, max_new_tokens=50, ignore_eos=True)
    other = GenerationRequest(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True)
    req.cancelled.set()
    Generator(cache).run(served, [req, other])
    assert req.finish_reason == "cancelled" and req.completion_tokens == 0
    assert other.finish_reason == "length" and other.completion_tokens == 6


def test_static_decoding_serves_base_and_adapter_with_the_dynamic_caches_answers(varied_model, citi_dir):
    """CITI_INFERENCE_DECODE=static (and cuda_graphs, eager on CPU) change how decoding runs, never what it says."""
    answers = {}
    for decode in ("dynamic", "static", "cuda_graphs"):
        cache = ModelCache(device="cpu", decode=decode)
        served = {"base": ServedModel(base=cache.base(varied_model)), "citi": cache.adapter("ft:a", citi_dir)}
        tok = served["base"].base.tokenizer
        for name, model in served.items():
            reqs = [GenerationRequest(prompt_ids=encode_prompt(tok, c["messages"], c.get("tools")), max_new_tokens=8)
                    for c in CONVERSATIONS]
            Generator(cache).run(model, reqs)
            answers[decode, name] = [(r.text, r.completion_tokens, r.finish_reason) for r in reqs]
    for name in ("base", "citi"):
        assert answers["static", name] == answers["dynamic", name] == answers["cuda_graphs", name]
    assert answers["dynamic", "base"] != answers["dynamic", "citi"]


def test_an_unknown_decode_mode_is_refused_when_the_cache_is_made():
    import pytest

    with pytest.raises(ValueError, match="CITI_INFERENCE_DECODE must be one of"):
        ModelCache(device="cpu", decode="turbo")


def test_an_adapters_call_threshold_is_served_under_auto_tool_choice_only(tmp_path, citi_dir):
    from citi_engine.adapter import write_calibration
    from citi_engine.data.chat_format import call_open_tokens
    from citi_service.chat import ChatCompletionRequest
    from worker.inference.app import InferenceService

    calibrated = tmp_path / "calibrated"
    shutil.copytree(citi_dir, calibrated)
    write_calibration(calibrated, 2.5, source="a test")
    service = InferenceService()
    plain, served = service.cache.adapter("plain", citi_dir), service.cache.adapter("calibrated", calibrated)
    assert (plain.call_threshold, served.call_threshold) == (0.0, 2.5)
    held = {token: -2.5 for token in call_open_tokens(served.tokenizer)}

    def bias(model, **body):
        req = ChatCompletionRequest(model="ft:x", messages=ASK, max_tokens=8, **body)
        return service.prepare(req, model)[0].opening_bias

    tools = {"tools": [WEATHER_TOOL]}
    assert len(held) >= 1 and bias(served, **tools) == held and bias(served, tool_choice="auto", **tools) == held
    assert bias(plain, **tools) == {} and bias(served) == {}  # no threshold, or no tools offered
    assert bias(served, tool_choice="required", **tools) == {}  # a forced call is not held back
    assert bias(served, tool_choice="none", **tools) == {}
    # a request's own threshold wins: 0 turns the adapter's off, a number sets one where the adapter has none
    assert bias(served, call_threshold=0, **tools) == {}
    assert bias(plain, call_threshold=1.0, **tools) == {token: -1.0 for token in held}


def test_served_with_a_call_threshold_a_reply_that_opens_with_text_has_no_calls_streamed_or_not():
    from citi_service.chat import ChatCompletionRequest
    from worker.inference.app import ToolCallStream, build_completion

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    req = ChatCompletionRequest(model="ft:x", messages=ASK, tools=[WEATHER_TOOL])
    for text, threshold, calls in [(call, True, 1), ("\n" + call, True, 1), ("Reply with " + call, True, 0),
                                   ("Reply with " + call, False, 1)]:
        gen = GenerationRequest(prompt_ids=[1], max_new_tokens=8, opening_bias={7: -2.0} if threshold else {})
        gen.text, gen.finish_reason = text, "stop"
        message = build_completion(req, gen, 1, "fp")["choices"][0]["message"]
        assert len(message.get("tool_calls", [])) == calls, text
        stream = ToolCallStream(req, opening_only=threshold)
        deltas = [d for k in range(0, len(text), 5) for d in stream.feed(text[k:k + 5])] + stream.finish()
        assert sum(1 for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]) == calls, text
        if not calls:
            assert "".join(d.get("content", "") for d in deltas) == text == message["content"]


def test_the_servers_decode_setting_takes_exactly_the_engines_decode_modes(monkeypatch):
    import pytest
    from pydantic import ValidationError

    from citi_engine import DECODE_MODES
    from worker.inference.app import InferenceSettings

    for mode in DECODE_MODES:
        monkeypatch.setenv("CITI_INFERENCE_DECODE", mode)
        assert InferenceSettings().inference_decode == mode
    monkeypatch.setenv("CITI_INFERENCE_DECODE", "turbo")
    with pytest.raises(ValidationError, match="compiled_graphs"):
        InferenceSettings()


def test_auto_decoding_is_the_default_of_the_server_and_of_jobs_and_takes_cuda_graphs_on_a_gpu_only(monkeypatch):
    import pytest

    from citi_engine import resolve_decode
    from citi_engine.training.config import Hyperparameters
    from worker.inference.app import InferenceSettings

    monkeypatch.delenv("CITI_INFERENCE_DECODE", raising=False)
    assert InferenceSettings().inference_decode == "auto" and Hyperparameters().generation_decode == "auto"
    assert (resolve_decode("auto", "cuda"), resolve_decode("auto", "cpu")) == ("cuda_graphs", "dynamic")
    assert [resolve_decode(m, "cuda") for m in ("dynamic", "static")] == ["dynamic", "static"]  # a named mode stays
    assert resolve_decode("cuda_graphs", "cpu") == "cuda_graphs"  # (static steps there: the decoder's own fallback)
    with pytest.raises(ValueError, match="decode must be one of auto, dynamic"):
        resolve_decode("turbo", "cpu")
    # the server resolves it for its device once (what /healthz reports); the cache only records the device here
    assert ModelCache(device="cpu").decode == "dynamic"
    assert ModelCache(device="cuda:1").decode == "cuda_graphs"
    assert ModelCache(device="cuda:1", decode="dynamic").decode == "dynamic"
