"""The three-stage trainer on a tiny real Llama: what each stage trains, cancel, resume, data errors.

Also home of the small helpers the other engine tests use (tiny data files, a small config).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from citi_engine.adapter import read_call_threshold  # noqa: E402
from citi_engine.budget import Budget, plan_stages  # noqa: E402
from citi_engine.errors import Cancelled, DataValidationError  # noqa: E402
from citi_engine.train import (  # noqa: E402
    CITI_STAGES,
    FinetuneConfig,
    FinetuneRecipe,
    TrainState,
    finetune,
    lr_factor,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito", "Bern", "Riga"]


def tool_example(i: int) -> dict:
    city = CITIES[i % len(CITIES)]
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return {"messages": [{"role": "user", "content": f"What is the weather in {city}?"},
                         {"role": "assistant", "tool_calls": [call]}],
            "tools": [WEATHER]}


def general_example(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_data(directory: Path, n_tool: int = 16, n_general: int = 6, name: str = "train.jsonl") -> str:
    """A valid training file: tool examples, then general ones."""
    rows = [tool_example(i) for i in range(n_tool)] + [general_example(i) for i in range(n_general)]
    return write_jsonl(directory / name, rows)


def small_config(model_dir: str, data: str, out_dir: Path | str, **overrides) -> FinetuneConfig:
    """A config sized for CPU tests: batch 2, short examples, tiny scoring/replay samples, no evaluation."""
    hp = {"batch_size": 2, "max_length": 192, "importance_examples": 4, "importance_batch_size": 4,
          "replay_examples": 4, "replay_max_new_tokens": 8, "eval_examples": 0, "eval_probes": 0,
          "eval_humaneval": 0}
    hp.update(overrides.pop("hyperparameters", {}))
    components = {"num_experts": 2, "rank": 4}
    components.update(overrides.pop("components", {}))
    fields = {"test_fraction": 0.0, "checkpoint_every": 0}
    fields.update(overrides)
    return FinetuneConfig(model=model_dir, training_file=data, out_dir=str(out_dir), hyperparameters=hp,
                          components=components, **fields)


def make_talkative_tiny_model(path: Path) -> str:
    """A tiny random Llama whose greedy replies are words, not blank lines.

    With tied embeddings a random model's last hidden state points back at its input token, so it
    answers every prompt with newlines forever; an untied random output head gives varied tokens,
    which replay and chat need to have something to keep.
    """
    from transformers import AutoModelForCausalLM

    from citi_engine.testing import make_tiny_model_dir

    model_dir = make_tiny_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return make_talkative_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def data_file(tmp_path) -> str:
    return write_data(tmp_path)


# ------------------------------------------------------------------------------ what each stage trains


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _stage_setup(tiny_model: str, method: str, tmp_path: Path):
    from citi_engine.adapter import apply_method
    from citi_engine.components import list_components
    from citi_engine.data.chat_format import encode_example
    from citi_engine.models import load_model

    model, tokenizer = load_model(tiny_model)
    components = list_components(model)
    torch.manual_seed(0)
    model = apply_method(model, method, molora=components[:3], uco=components[5:7], num_experts=2, rank=4,
                         alpha=16)
    examples = [tool_example(i) for i in range(6)] + [general_example(i) for i in range(4)]
    pool = [encode_example(tokenizer, e, 192) for e in examples]
    cfg = small_config(tiny_model, "unused.jsonl", tmp_path, method=method)
    return model, tokenizer, pool, cfg


def _recipe(model, tokenizer, pool, cfg, plan, state: TrainState) -> FinetuneRecipe:
    """A recipe holding an already adapted model, its pool and plan: what ``train_stage`` reads (CPU, fp32)."""
    recipe = FinetuneRecipe(cfg)
    recipe.model, recipe.tokenizer, recipe.pool, recipe.plan, recipe.state = model, tokenizer, pool, plan, state
    recipe.pad_id = tokenizer.pad_token_id
    return recipe


def test_each_citi_stage_changes_exactly_its_parameters_and_nothing_else(tiny_model, tmp_path):
    model, tokenizer, pool, cfg = _stage_setup(tiny_model, "citi", tmp_path)
    # Two steps per stage: every B_i starts at zero, so A_i only gets a gradient from the second step on.
    plan = plan_stages(list(CITI_STAGES), [1, 1, 1], [2, 2, 2], Budget(), tokens_per_step=1.0)
    names = list(model.state_dict())
    routers = {n for n in names if "molora_router" in n}
    experts = {n for n in names if "molora_A" in n or "molora_B" in n}
    uco = {n for n in names if "modules_to_save" in n}
    assert routers and experts and uco
    expected = {"router_pretraining": routers, "molora": routers | experts, "uco": uco}
    for si, stage in enumerate(CITI_STAGES):
        before = _snapshot(model)
        _recipe(model, tokenizer, pool, cfg, plan, TrainState(stage_index=si)).train_stage(si)
        assert _changed(before, _snapshot(model)) == expected[stage], stage


@pytest.mark.parametrize(("setting", "on", "off"), [("routing_detach", "detach_router", "detach_router_input"),
                                                     ("routing_detach_input", "detach_router_input", "detach_router")])
def test_a_routing_detach_setting_reaches_every_molora_layer_and_the_routers_still_train(tiny_model, tmp_path,
                                                                                          setting, on, off):
    from citi_engine.adapter import molora_layers

    model, tokenizer, pool, cfg = _stage_setup(tiny_model, "citi", tmp_path)
    setattr(cfg.hyperparameters, setting, True)
    if setting == "routing_detach":
        cfg.hyperparameters.routing_beta = 0.0  # the token-level objective alone trains the routers
    plan = plan_stages(list(CITI_STAGES), [1, 1, 1], [2, 2, 2], Budget(), tokens_per_step=1.0)
    before = _snapshot(model)
    _recipe(model, tokenizer, pool, cfg, plan, TrainState(stage_index=1)).train_stage(1)
    layers = molora_layers(model)
    assert layers
    assert all(getattr(layer, on) and not getattr(layer, off) for layer in layers)
    changed = _changed(before, _snapshot(model))
    assert {n for n in changed if "molora_router" in n} == {n for n in before if "molora_router" in n}


@pytest.mark.parametrize("balance", ["sum", "mean"])
def test_a_job_adds_the_balancing_loss_its_routing_balance_names(tiny_model, tmp_path, balance):
    from citi_engine.adapter import routing_loss
    from citi_engine.packing import pad_batches
    from citi_engine.train import step_loss_module
    from citi_engine.training.batches import answer_tokens, routing_token_counts

    model, _, pool, cfg = _stage_setup(tiny_model, "citi", tmp_path)
    cfg.hyperparameters.routing_balance = balance
    cfg.hyperparameters.routing_token_weight = 0.0  # the balancing term alone
    examples = [pool[0], pool[7]]  # a tool example and a general one, of different lengths
    assert len(examples[0]["input_ids"]) != len(examples[1]["input_ids"])
    module = step_loss_module(model, cfg, routing_loss=routing_loss, device=torch.device("cpu"),
                              frozen_dtype=torch.float32)
    batch = pad_batches(examples, max_tokens=10_000)[0]
    _, _, routed = module(batch, n_answer=answer_tokens(examples), n_examples=2,
                          n_route=routing_token_counts(examples))
    expected = cfg.hyperparameters.routing_beta * routing_loss(model, batch["task_type"], batch["attention_mask"],
                                                               cfg.hyperparameters.routing_delta, balance)
    other = routing_loss(model, batch["task_type"], batch["attention_mask"], cfg.hyperparameters.routing_delta,
                         "mean" if balance == "sum" else "sum")
    torch.testing.assert_close(routed, expected.detach())
    assert abs(float(other) - float(expected) / cfg.hyperparameters.routing_beta) > 1e-6


def test_lora_stage_changes_only_lora_weights(tiny_model, tmp_path):
    model, tokenizer, pool, cfg = _stage_setup(tiny_model, "lora", tmp_path)
    plan = plan_stages(["train"], [1], [2], Budget(), tokens_per_step=1.0)
    lora = {n for n in model.state_dict() if "lora_A" in n or "lora_B" in n}
    before = _snapshot(model)
    _recipe(model, tokenizer, pool, cfg, plan, TrainState()).train_stage(0)
    assert lora and _changed(before, _snapshot(model)) == lora


def test_learning_rate_warm_up_starts_above_zero_and_cosine_stays_above_zero():
    assert lr_factor(0, 1, 0.1) == 1.0  # a one-step stage trains at its peak rate
    factors = [lr_factor(k, 20, 0.1) for k in range(20)]
    assert factors[0] == 0.5 and factors[1] == 1.0  # 2 warm-up steps
    assert all(f > 0 for f in factors)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))


# ------------------------------------------------------------------------------------------ end to end


def test_finetune_citi_writes_adapter_importance_card_and_job(tiny_model, data_file, tmp_path):
    events = []
    out = tmp_path / "out"
    result = finetune(small_config(tiny_model, data_file, out, budget={"max_steps": 3}), on_event=events.append)
    assert result.steps == 3 and result.stage_steps == {"router_pretraining": 1, "molora": 1, "uco": 1}
    for name in ("adapter_config.json", "adapter_model.safetensors", "importance.json", "importance.png",
                 "citi_job.json", "README.md"):
        assert (out / name).is_file(), name
    job = json.loads((out / "citi_job.json").read_text())
    assert job["method"] == "citi" and job["base_model"] == tiny_model
    assert FinetuneConfig.from_dict(job["config"]) == small_config(tiny_model, data_file, out,
                                                                   budget={"max_steps": 3})
    importance = json.loads((out / "importance.json").read_text())
    chosen = result.selected_components
    assert importance["molora"] == chosen["molora"] and importance["uco"] == chosen["uco"]
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()
    # The job brought general examples, so no replay ran; every event carries the contract's keys.
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages[:3] == ["validating", "loading", "importance"] and "replay" not in stages
    keys = {"type", "stage", "step", "total_steps", "loss", "routing_loss", "lr", "tokens_per_s", "eta_s", "message"}
    assert all(keys <= set(e) for e in events)
    progress = [e for e in events if e["type"] == "progress" and e["stage"] in CITI_STAGES]
    assert [e["step"] for e in progress] == [1, 2, 3]
    assert all(e["lr"] > 0 and e["routing_loss"] is not None for e in progress)
    assert events[-1]["type"] == "done"


def test_a_job_with_the_sigmoid_gate_trains_saves_and_reloads_its_routers_with_it(tiny_model, data_file, tmp_path):
    from citi_engine.adapter import load_adapter, molora_layers

    out = tmp_path / "out"
    result = finetune(small_config(tiny_model, data_file, out, budget={"max_steps": 3},
                                   hyperparameters={"routing_gate": "sigmoid"}))
    assert result.steps == 3
    assert json.loads((out / "adapter_config.json").read_text())["gate"] == "sigmoid"
    model, _ = load_adapter(out, device="cpu")
    layers = molora_layers(model)
    assert layers and {layer.gate["default"] for layer in layers} == {"sigmoid"}
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    for layer in layers:  # G(x)[0] is the sigmoid of the router's first logit
        g = layer.router_probs["default"]
        torch.testing.assert_close(g.sum(-1), torch.ones_like(g[..., 0]))


def test_replay_builds_general_data_when_the_job_brings_none(tiny_model, tmp_path):
    data = write_data(tmp_path, n_tool=12, n_general=0)
    events = []
    out = tmp_path / "out"
    finetune(small_config(tiny_model, data, out, budget={"max_steps": 3}), on_event=events.append)
    replay = [e for e in events if e["stage"] == "replay" and e["type"] == "progress"]
    assert replay and replay[-1]["step"] == replay[-1]["total_steps"] == 4
    assert [e["step"] for e in replay] == [2, 4]  # on CPU the replay is generated batch_size (2) rows at a time
    importance = json.loads((out / "importance.json").read_text())
    assert "general/replay" in importance["components"][0]["T"]
    saved = (out / "checkpoints" / "stage-0-start" / "replay.jsonl").read_text().splitlines()
    assert 1 <= len(saved) <= 4 and json.loads(saved[0])["messages"][1]["role"] == "assistant"


def test_generation_batch_size_sets_the_rows_the_replay_generates_at_once(tiny_model, tmp_path):
    data = write_data(tmp_path, n_tool=12, n_general=0)
    events = []
    finetune(small_config(tiny_model, data, tmp_path / "out", budget={"max_steps": 3},
                          hyperparameters={"generation_batch_size": 4}), on_event=events.append)
    replay = [e["step"] for e in events if e["stage"] == "replay" and e["type"] == "progress"]
    assert replay == [4]


def test_a_job_decoding_through_a_static_cache_writes_the_replay_answers_of_a_dynamic_one(tiny_model, tmp_path):
    data = write_data(tmp_path, n_tool=12, n_general=0)
    answers = {}
    for decode in ("dynamic", "static"):
        out = tmp_path / decode
        finetune(small_config(tiny_model, data, out, budget={"max_steps": 3},
                              hyperparameters={"generation_decode": decode}))
        answers[decode] = (out / "checkpoints" / "stage-0-start" / "replay.jsonl").read_text()
    assert answers["static"] == answers["dynamic"] and answers["dynamic"].strip()


def test_held_out_test_split_is_evaluated_and_reported(tiny_model, data_file, tmp_path):
    out = tmp_path / "out"
    cfg = small_config(tiny_model, data_file, out, method="lora", test_fraction=0.25, budget={"max_steps": 1},
                       hyperparameters={"eval_examples": 2, "eval_probes": 2, "eval_max_new_tokens": 8})
    result = finetune(cfg)
    split = (out / "test_split.jsonl").read_text().splitlines()
    assert len(split) == 4  # 25% of 16 tool examples, all of them tool examples
    assert all(json.loads(line)["tools"] for line in split)
    report = json.loads(Path(result.report_path).read_text())
    assert report["summary"]["n_test"] == 2 and report["summary"]["n_probes"] == 2
    assert (out / "report.md").is_file()
    # call_threshold unset: chosen on the held-out calls; every example offers one function only, so no request
    # that no offered tool fits can be built from them and nothing is held back
    calibration = report["calibration"]
    assert calibration["n_call_cases"] == 2 and calibration["built_no_call_cases"] == 0
    assert read_call_threshold(out) == calibration["threshold"] == report["summary"]["call_threshold"] == 0


def test_call_threshold_is_chosen_on_held_out_calls_and_no_call_requests_built_from_them(tiny_model, tmp_path):
    clock = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                              "parameters": {"type": "object", "properties": {
                                                  "city": {"type": "string"}}, "required": ["city"]}}}
    rows = [tool_example(i) for i in range(16)]
    for row in rows[::2]:  # every other example asks the time, with both functions offered
        call = row["messages"][1]["tool_calls"][0]
        row["messages"][0]["content"] = row["messages"][0]["content"].replace("weather", "time")
        call["function"]["name"] = "get_time"
        row["tools"] = [clock, WEATHER]
    data = write_jsonl(tmp_path / "train.jsonl", rows + [general_example(i) for i in range(6)])
    out = tmp_path / "out"
    cfg = small_config(tiny_model, data, out, method="lora", test_fraction=0.25, budget={"max_steps": 1},
                       hyperparameters={"eval_examples": 4, "eval_max_new_tokens": 4, "max_length": 320})
    report = json.loads(Path(finetune(cfg).report_path).read_text())
    calibration = report["calibration"]
    assert calibration["n_call_cases"] == 4 and calibration["built_no_call_cases"] >= 2
    assert calibration["n_no_call_cases"] == calibration["built_no_call_cases"]
    at_t = calibration["at_threshold"]["balanced_accuracy"]
    assert at_t >= calibration["at_zero"]["balanced_accuracy"]
    assert read_call_threshold(out) == calibration["threshold"] >= 0


def test_a_call_threshold_set_by_the_job_is_recorded_for_serving_without_calibrating(tiny_model, data_file,
                                                                                     tmp_path):
    out = tmp_path / "out"
    cfg = small_config(tiny_model, data_file, out, method="lora", test_fraction=0.25, budget={"max_steps": 1},
                       hyperparameters={"eval_examples": 2, "eval_probes": 0, "eval_max_new_tokens": 4,
                                        "call_threshold": 1.5})
    result = finetune(cfg)
    assert read_call_threshold(out) == 1.5
    assert "calibration" not in json.loads(Path(result.report_path).read_text())
    with pytest.raises(ValueError, match="call_threshold"):
        small_config(tiny_model, data_file, out, hyperparameters={"call_threshold": -1.0})


# ------------------------------------------------------------------------------------------ cancel


@pytest.mark.parametrize("phase", ["replay", "importance", "molora", "eval"])
def test_cancel_stops_every_phase_within_one_step(tiny_model, tmp_path, phase):
    n_general = 0 if phase == "replay" else 6
    data = write_data(tmp_path, n_tool=16, n_general=n_general)
    flag = {"cancel": False, "after": []}

    def on_event(event):
        if flag["cancel"]:
            flag["after"].append(event)
        elif event["stage"] == phase and event["type"] in ("progress", "stage") and (
            phase == "eval" or event["type"] == "progress"
        ):
            flag["cancel"] = True

    cfg = small_config(tiny_model, data, tmp_path / "out", test_fraction=0.25, budget={"max_steps": 6},
                       hyperparameters={"replay_examples": 8, "importance_batch_size": 2, "eval_examples": 4,
                                        "eval_probes": 2, "eval_max_new_tokens": 8})
    with pytest.raises(Cancelled):
        finetune(cfg, on_event=on_event, should_cancel=lambda: flag["cancel"])
    assert flag["cancel"]
    # No further step of the phase ran after the flag was raised.
    assert not [e for e in flag["after"] if e["type"] in ("progress", "eval", "done")]


# ------------------------------------------------------------------------------------------ resume


def assert_same_adapter(a: Path, b: Path, *, rtol: float, atol: float) -> None:
    """The adapter weights in directories ``a`` and ``b`` have the same tensors, equal within tolerance."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=rtol, atol=atol, msg=name)


def test_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tiny_model, data_file, tmp_path):
    def cfg(out):  # 8 steps: 2 / 5 / 1 over the stages; periodic checkpoints at steps 4 and 6, inside stage 2
        return small_config(tiny_model, data_file, out, budget={"max_steps": 8}, checkpoint_every=2)

    straight = finetune(cfg(tmp_path / "a"))

    steps_seen = []

    def stop_after_five(event):
        if event["type"] == "progress" and event["stage"] in CITI_STAGES:
            steps_seen.append(event["step"])

    with pytest.raises(Cancelled):
        finetune(cfg(tmp_path / "b"), on_event=stop_after_five, should_cancel=lambda: len(steps_seen) >= 5)
    assert steps_seen == [1, 2, 3, 4, 5]
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert checkpoints == ["stage-0-start", "stage-1-start", "step-00000004"]  # the step-2 one was pruned

    resumed_steps = []
    resumed = finetune(cfg(tmp_path / "b"),
                       on_event=lambda e: resumed_steps.append(e["step"]) if e["type"] == "progress" else None)
    assert resumed_steps == [5, 6, 7, 8]  # from the mid-stage checkpoint at step 4, not from scratch
    assert resumed.steps == straight.steps == 8 and resumed.trained_tokens == straight.trained_tokens
    assert_same_adapter(tmp_path / "a", tmp_path / "b", rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_job_are_not_resumed(tiny_model, data_file, tmp_path):
    out = tmp_path / "out"
    finetune(small_config(tiny_model, data_file, out, budget={"max_steps": 3}))
    with pytest.raises(ValueError, match="different job.*lr_molora"):
        finetune(small_config(tiny_model, data_file, out, budget={"max_steps": 3},
                              hyperparameters={"lr_molora": 2e-3}))


# ------------------------------------------------------------------------------------------ data


def test_bad_training_file_lists_every_problem_with_its_line(tiny_model, tmp_path):
    rows = [tool_example(i) for i in range(12)]
    rows[2] = "{not json"
    rows[7] = {"messages": [{"role": "robot", "content": "hi"}]}
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataValidationError) as info:
        finetune(small_config(tiny_model, data, tmp_path / "out"))
    lines = {(p.line, p.code) for p in info.value.problems}
    assert (3, "invalid_json") in lines and (8, "unknown_role") in lines
    assert info.value.param == "training_file"


def test_examples_longer_than_max_length_are_refused_with_their_lines(tiny_model, tmp_path):
    rows = [tool_example(i) for i in range(12)]
    rows[4]["messages"][0]["content"] = "Tell me the weather. " * 80
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataValidationError) as info:
        finetune(small_config(tiny_model, data, tmp_path / "out"))
    assert [(p.line, p.code) for p in info.value.problems] == [(5, "too_long")]


def test_missing_training_file_says_so(tiny_model, tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        finetune(small_config(tiny_model, str(tmp_path / "nope.jsonl"), tmp_path / "out"))


# ------------------------------------------------------------------------------------------ config


def test_ablations_no_uco_stage_and_random_components(tiny_model, data_file, tmp_path):
    """uco_fraction=0 runs CITI without stage 3; selection=random draws the sets without the scores."""
    out = tmp_path / "no_uco"
    result = finetune(small_config(tiny_model, data_file, out, budget={"max_steps": 2},
                                   components={"uco_fraction": 0.0}))
    assert result.stage_steps == {"router_pretraining": 1, "molora": 1} and result.selected_components["uco"] == []
    assert not json.loads((out / "adapter_config.json").read_text()).get("modules_to_save")

    ranked = finetune(small_config(tiny_model, data_file, tmp_path / "ranked", budget={"max_steps": 3},
                                   components={"molora_fraction": 0.25}))
    drawn = [finetune(small_config(tiny_model, data_file, tmp_path / f"random{seed}", budget={"max_steps": 3},
                                   components={"molora_fraction": 0.25, "selection": "random"}, seed=seed))
             for seed in (0, 1)]
    for r in drawn:  # the same budget, disjoint sets
        assert len(r.selected_components["molora"]) == len(ranked.selected_components["molora"])
        assert len(r.selected_components["uco"]) == len(ranked.selected_components["uco"])
        assert not set(r.selected_components["molora"]) & set(r.selected_components["uco"])
    # the seed, not the scores, decides: two seeds draw different sets
    assert drawn[0].selected_components != drawn[1].selected_components


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "qlora"}, "unknown method"),
        ({"components": {"molora_fraction": 0.0}}, "molora_fraction must be a number > 0 and < 1"),
        ({"components": {"uco_fraction": 1.5}}, "uco_fraction must be a number >= 0 and < 1"),
        ({"components": {"selection": "best"}}, "importance' or 'random"),
        ({"components": {"molora_fraction": 0.7, "uco_fraction": 0.4}}, "at most all components"),
        ({"budget": {"max_steps": -1}}, "max_steps must be a whole number from 1 to"),
        ({"budget": {"max_seconds": 0}}, "max_seconds must be a number > 0"),
        ({"hyperparameters": {"lr_molora": 0}}, "lr_molora must be a number > 0"),
        ({"hyperparameters": {"batch_size": 0}}, "batch_size must be a whole number from 1 to 4096"),
        # every number has a finite upper bound, and non-finite numbers are refused by name
        ({"budget": {"max_steps": 2**63}}, "max_steps must be a whole number from 1 to 10000000"),
        ({"budget": {"max_seconds": float("inf")}}, "max_seconds .*not a finite number"),
        ({"hyperparameters": {"batch_size": 10**12}}, "batch_size must be a whole number from 1 to 4096"),
        ({"hyperparameters": {"lr_molora": float("inf")}}, "lr_molora .*not a finite number"),
        ({"hyperparameters": {"lr_uco": float("nan")}}, "lr_uco .*not a finite number"),
        ({"hyperparameters": {"pack_tokens": 2**40}}, "pack_tokens must be a whole number from 16"),
        ({"hyperparameters": {"replay_examples": 10**9}}, "replay_examples must be"),
        ({"components": {"num_experts": 10**6}}, "num_experts must be a whole number from 1 to 64"),
        ({"components": {"rank": 2**20}}, "rank must be a whole number from 1 to 1024"),
        ({"seed": 2**63}, "seed must be a whole number from 0 to 2147483647"),
        ({"hyperparameters": {"routing_delta": 1.0}}, "routing_delta"),
        ({"hyperparameters": {"learning_rate": 1e-4}}, "unknown hyperparameters field"),
        ({"test_fraction": 0.9}, "test_fraction"),
        ({"dtype": "fp16"}, "fp16 is not supported"),
        ({"hyperparameters": {"generation_decode": "graphs"}}, "generation_decode must be one of auto, dynamic, static"),
    ],
)
def test_impossible_configs_are_refused_with_the_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(training_file="t.jsonl", out_dir="o", **fields)


def test_config_round_trips_through_a_plain_dict():
    cfg = FinetuneConfig(training_file="t.jsonl", out_dir="o", method="lora", budget={"max_tokens": 1000},
                         hyperparameters={"routing_beta_per_layer": True})
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.stages == ("train",) and cfg.stage_lrs() == [1e-3]
    assert FinetuneConfig(training_file="t", out_dir="o", method="full").stage_lrs() == [1e-4]


def test_citi_profile_dir_profiles_a_few_steps_of_each_stage_without_changing_what_is_trained(
        tiny_model, data_file, tmp_path, monkeypatch, caplog):
    def cfg(out):  # 8 steps: 2 / 5 / 1 over the stages
        return small_config(tiny_model, data_file, out, budget={"max_steps": 8})

    plain = finetune(cfg(tmp_path / "plain"))
    monkeypatch.setenv("CITI_PROFILE_DIR", str(tmp_path / "profile"))
    monkeypatch.setenv("CITI_PROFILE_SKIP", "1")  # steps 1 and 2 of each stage (from 0), where a stage has them
    monkeypatch.setenv("CITI_PROFILE_STEPS", "two")  # not a number: the default, 3, with a warning
    with caplog.at_level(logging.WARNING, logger="citi.profile"):
        profiled = finetune(cfg(tmp_path / "profiled"))
    assert "CITI_PROFILE_STEPS='two' is not a whole number" in caplog.text
    assert profiled.trained_sha256 == plain.trained_sha256  # watched steps train exactly as the others
    written = {p.name for p in (tmp_path / "profile").iterdir()}
    # uco's one step is step 0, before the profiled ones: nothing for it
    assert written == {f"{s}.profile.{ext}" for s in ("router_pretraining", "molora") for ext in ("txt", "json")}
    for stage, steps in (("router_pretraining", 1), ("molora", 3)):  # stage 1 ends after its step 1
        doc = json.loads((tmp_path / "profile" / f"{stage}.profile.json").read_text())
        assert doc["stage"] == stage and doc["steps"] == steps and len(doc["wall_s"]) == steps
        assert all(w > 0 for w in doc["wall_s"]) and doc["busy_us"] > 0 and doc["top"]
        assert "aten::" in (tmp_path / "profile" / f"{stage}.profile.txt").read_text()
