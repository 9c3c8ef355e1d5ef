"""General retention (KL, agreement, HumanEval NLL) and evaluate_adapter on tiny real models."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from citi_engine.data.chat_format import call_open_tokens
from citi_engine.errors import Cancelled
from citi_engine.evaluate import evaluate_adapter
from citi_engine.evaluate.retention import (
    general_retention,
    general_retention_from_peft,
    load_humaneval,
    run_humaneval_program,
)
from citi_engine.models import load_model
from citi_engine.testing import make_tiny_model_dir, vary_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROBES = ["Name a colour.", "What is the capital of France?", "Write a haiku about rain."]
FAST = dict(max_new_tokens=6, batch_size=4, kl_batch_size=4, humaneval_limit=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model, tok = load_model(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")), device="cpu")
    vary_weights(model)
    return model, tok


def citi_with_random_experts(model, seed):
    """A copy of ``model`` with MOLoRA on two components whose router and experts are random (not zero)."""
    from citi_engine.adapter import apply_method, molora_layers

    tuned = apply_method(copy.deepcopy(model), "citi", molora=["model.layers.0.self_attn.q_proj",
                                                               "model.layers.1.mlp.down_proj"],
                         num_experts=2, rank=2, alpha=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in molora_layers(tuned):
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer"):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return tuned


def perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


def test_base_against_itself_retains_everything(base):
    model, tok = base
    r = general_retention(model, model, tok, PROBES, **FAST)
    assert r["general_retention"] == 1.0 and r["kl"] == 0.0 and r["agreement"] == 1.0
    assert r["n_probes"] == 3 and r["answer_tokens"] > 0
    assert all(p["kl"] == 0.0 and p["agree"] for p in r["per_probe"])
    he = r["humaneval"]
    assert he["n"] == 2 and he["nll_delta"] == 0.0 and he["base_nll"] > 0


def test_perturbed_weights_lower_retention(base):
    model, tok = base
    r = general_retention(model, perturbed(model), tok, PROBES, **FAST)
    assert r["kl"] > 1e-3
    assert r["general_retention"] == pytest.approx(math.exp(-r["kl"]))
    assert r["general_retention"] < 1.0
    assert r["agreement"] < 1.0 and r["disagreements"]
    assert r["humaneval"]["nll_delta"] != 0.0
    # The headline KL is the token-weighted mean of the per-probe values.
    pp = r["per_probe"]
    assert r["kl"] == pytest.approx(sum(p["kl"] * p["tokens"] for p in pp) / sum(p["tokens"] for p in pp))


def test_probe_limit_uses_only_the_first_probes(base):
    model, tok = base
    r = general_retention(model, model, tok, PROBES, limit=2, humaneval=False, max_new_tokens=3)
    assert r["n_probes"] == 2 and r["humaneval"] is None


def test_peft_adapter_switched_off_is_the_base_modules_to_save_included(base):
    from peft import LoraConfig, get_peft_model

    model, tok = base
    original = copy.deepcopy(model)
    tuned = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["model.layers.1.mlp.down_proj"],
        init_lora_weights=False))
    with torch.no_grad():  # move the modules_to_save copy away from the base weights
        for name, p in tuned.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)
    # As between training stages: some adapter weights frozen on purpose.
    tuned.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}

    one_model = general_retention_from_peft(tuned, tok, PROBES, **FAST)
    two_models = general_retention(original, tuned, tok, PROBES, **FAST)
    assert one_model["kl"] > 1e-3
    assert one_model["kl"] == pytest.approx(two_models["kl"], rel=1e-5)
    assert [p["agree"] for p in one_model["per_probe"]] == [p["agree"] for p in two_models["per_probe"]]
    assert one_model["humaneval"]["nll_delta"] == pytest.approx(two_models["humaneval"]["nll_delta"], rel=1e-5)
    # peft re-enables adapters as trainable; the trainer's frozen/trainable choice must survive.
    assert {n: p.requires_grad for n, p in tuned.named_parameters()} == flags


def test_citi_adapter_switched_off_is_the_base(base):
    from citi_engine.adapter import apply_method, molora_layers

    model, tok = base
    tuned = apply_method(copy.deepcopy(model), "citi", molora=["model.layers.0.self_attn.k_proj"],
                         uco=["model.layers.1.self_attn.o_proj"], num_experts=2, rank=2, alpha=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # experts start at B = 0; give them and the UCO copy weights of their own
        for layer in molora_layers(tuned):
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer"):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, p in tuned.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    one_model = general_retention_from_peft(tuned, tok, PROBES, **FAST)
    two_models = general_retention(model, tuned, tok, PROBES, **FAST)
    assert one_model["kl"] > 1e-3
    assert one_model["kl"] == pytest.approx(two_models["kl"], rel=1e-5)


def test_peft_route_refuses_a_plain_model(base):
    model, tok = base
    with pytest.raises(TypeError, match="load the base model separately"):
        general_retention_from_peft(model, tok, PROBES, **FAST)


def test_cancel_flag_stops_retention(base):
    model, tok = base
    with pytest.raises(Cancelled):
        general_retention(model, model, tok, PROBES, should_cancel=lambda: True, **FAST)


def test_humaneval_programs_run_in_a_separate_limited_process():
    problem = load_humaneval(limit=1)[0]
    assert run_humaneval_program(problem, problem["canonical_solution"])
    assert not run_humaneval_program(problem, "    return not " + problem["canonical_solution"].strip()[7:])
    assert not run_humaneval_program(problem, "    while True:\n        pass\n", timeout=1.0)


def test_evaluate_adapter_writes_a_report(base, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = base
    tuned = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    cases = [
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather], "category": "simple",
         "ground_truth": [{"get_weather": {"city": ["Paris"]}}]},
        {"messages": [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}],
         "tools": [weather]},
    ]
    events = []
    report = evaluate_adapter(tuned, tok, None, cases, PROBES, tmp_path, max_new_tokens=4,
                              retention_max_new_tokens=4, humaneval_limit=1, metadata={"method": "lora"},
                              on_event=events.append)
    assert report["tool"]["n"] == 2 and set(report["tool"]["per_category"]) == {"simple", "irrelevance"}
    assert report["summary"]["general_retention"] == pytest.approx(math.exp(-report["retention"]["kl"]))
    assert report["summary"]["kl"] > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["method"] == "lora" and saved["summary"]["n_test"] == 2
    assert (tmp_path / "report.md").is_file() and (tmp_path / "eval_tool_accuracy.png").is_file()
    assert events[-1]["type"] == "eval" and events[-1]["stage"] == "eval"


def test_evaluate_adapter_at_a_call_threshold_answers_as_served(base, tmp_path):
    """With a threshold far above any margin, no reply opens a call, where greedy replies all would."""
    model, tok = base
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    cases = [{"messages": [{"role": "user", "content": f"Weather in {x}?"}], "tools": [weather],
              "category": "simple", "ground_truth": [{"get_weather": {"city": [x]}}]} for x in ("Oslo", "Rome", "Lima")]
    opening = list(call_open_tokens(tok))

    def push(module, inputs, output):  # every reply would open with a call
        output[..., opening] += 30.0
        return output

    handle = model.lm_head.register_forward_hook(push)
    try:
        report = evaluate_adapter(model, tok, None, cases, [], tmp_path, max_new_tokens=4, call_threshold=1e3)
    finally:
        handle.remove()
    greedy, at_t = report["tool"]["failures"], report["tool_at_threshold"]["failures"]
    assert len(greedy) == len(at_t) == 3  # a random model calls nothing right either way
    assert all(f["reply"].lstrip().startswith("<") for f in greedy)
    assert not any(f["reply"].lstrip().startswith("<") for f in at_t)
    assert report["tool_at_threshold"]["call_threshold"] == 1e3
    assert report["summary"]["tool_accuracy_at_threshold"] == 0.0


def test_base_against_itself_with_unrelated_tools_offered_retains_everything(base):
    from citi_engine.data.prompts import probes_with_tools

    model, tok = base
    probes = probes_with_tools(PROBES)
    assert all(p["tools"] for p in probes)
    r = general_retention(model, model, tok, probes, **{**FAST, "humaneval_limit": None}, humaneval=False)
    assert r["general_retention"] == 1.0 and r["kl"] == 0.0 and r["agreement"] == 1.0
    assert r["with_tools"] is True and r["answer_tokens"] > 0


def test_citi_report_gives_router_separation_and_the_lower_retention_as_headline(base, tmp_path):
    model, tok = base
    tuned = citi_with_random_experts(model, seed=5)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    cases = [{"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather],
              "category": "simple", "ground_truth": [{"get_weather": {"city": ["Paris"]}}]}]
    report = evaluate_adapter(tuned, tok, None, cases, PROBES, tmp_path, max_new_tokens=4,
                              retention_max_new_tokens=4, humaneval=False)
    s = report["summary"]
    assert s["headline_retention"] == min(s["general_retention"], s["retention_with_tools"])
    router = report["router"]
    for key in ("general", "general_with_tools", "tool_call"):
        d = router[key]
        assert d["tokens"] > 0 and 0.0 < d["mean"] < 1.0
        assert set(d["per_layer"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
        assert d["mean"] == pytest.approx(sum(d["per_layer"].values()) / 2)
    assert s["backbone_gate_general"] == router["general"]["mean"]
    assert s["backbone_gate_tool_call"] == router["tool_call"]["mean"]
    text = (tmp_path / "report.md").read_text()
    assert "Router separation" in text and "model.layers.1.mlp.down_proj" in text


def test_a_model_without_molora_reports_no_router():
    from citi_engine.evaluate.routing import separation

    assert separation(None, None, None) is None


def test_answer_log_probs_in_chunks_equal_one_forward_over_right_padded_rows(base):
    """Left padding and a chunked forward give the log-probabilities of the plain teacher-forced forward."""
    from citi_engine.evaluate.retention import _answer_log_probs

    model, _ = base
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompts = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in (23, 7, 15)]
    answers = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in (4, 11, 1)]
    expected = []
    with torch.inference_mode():
        for p, a in zip(prompts, answers, strict=True):  # one row at a time: no padding at all
            logits = model(input_ids=torch.tensor([p + a]), use_cache=False).logits[0]
            expected.append(torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(a)].float(), dim=-1))
    for chunk in (5, 8, 64):
        got = _answer_log_probs(model, prompts, answers, chunk=chunk)
        assert [g.shape for g in got] == [(len(a), vocab) for a in answers]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_tool_call_gates_in_chunks_equal_one_forward(base):
    from citi_engine.evaluate.routing import tool_call_gates
    from citi_engine.evaluate.tool_eval import cases_from_dicts

    model, tok = base
    tuned = citi_with_random_experts(model, seed=7)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    cases = cases_from_dicts([
        {"messages": [{"role": "user", "content": text}], "tools": [weather], "category": "simple",
         "ground_truth": [{"get_weather": {"city": [city]}}]}
        for text, city in (("Weather in Paris?", "Paris"), ("Is it raining in Rio de Janeiro right now?", "Rio"))])
    whole = tool_call_gates(tuned, tok, cases, chunk=10**6)
    chunked = tool_call_gates(tuned, tok, cases, chunk=7)
    assert whole["tokens"] == chunked["tokens"] > 0 and whole["cases"] == chunked["cases"] == 2
    assert chunked["mean"] == pytest.approx(whole["mean"], abs=1e-5)
    for name, gate in whole["per_layer"].items():
        assert chunked["per_layer"][name] == pytest.approx(gate, abs=1e-5)
