"""The method's retention and routing pieces on tiny real models: soft targets, token-level routing, negatives,
retention with tools offered."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from citi_engine.adapter import (
    AdaptersOff,
    apply_method,
    backbone_targets,
    detach_routers,
    molora_layers,
    token_routing_loss,
)
from citi_engine.components import list_components
from citi_engine.data.schemas import ExampleKind
from citi_engine.losses import Teacher, answer_losses
from citi_engine.packing import IGNORE_INDEX, pack_examples, pad_batches
from citi_engine.testing import tiny_llama

VOCAB = 300


def _citi_model(seed=0, gate="softmax"):
    model = tiny_llama(vocab_size=VOCAB, hidden=64, intermediate=128, max_positions=512, seed=seed,
                       attn_implementation="sdpa", use_cache=False).train()
    names = list_components(model)
    return apply_method(model, "citi", molora=names[::3], uco=names[1:2], num_experts=2, rank=4, alpha=8, gate=gate)


def _examples(kinds, seed=0):
    """Random token examples of the given kinds, each with a prompt and a labelled answer."""
    rng = random.Random(seed)
    out = []
    for kind in kinds:
        n = rng.randrange(14, 40)
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        cut = rng.randrange(4, n - 4)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:], "kind": int(kind),
                    "task_type": 0 if kind == ExampleKind.GENERAL else 1})
    return out


def _move_adapters(model, scale=0.5, seed=1):
    """Give every expert and UCO copy a non-zero change, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "molora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale * (0.1 if "modules_to_save" in name else 1.0))


def _reference_kl_sum(model, batch):
    """sum over the answer positions of general examples of KL(base || tuned), from full logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    with torch.no_grad():
        tuned = model(**inputs).logits.float()
        with AdaptersOff(model)():
            base = model(**inputs).logits.float()
    shifted = torch.full_like(batch["labels"], IGNORE_INDEX)
    shifted[:, :-1] = batch["labels"][:, 1:]
    general_rows = batch["token_kind"] == int(ExampleKind.GENERAL)
    keep = (shifted != IGNORE_INDEX) & general_rows
    log_p = F.log_softmax(base[keep], -1)
    log_q = F.log_softmax(tuned[keep], -1)
    return (log_p.exp() * (log_p - log_q)).sum()


def test_soft_target_loss_equals_kl_to_the_adapter_disabled_model():
    model = _citi_model()
    _move_adapters(model)
    kinds = [ExampleKind.GENERAL, ExampleKind.TOOL, ExampleKind.GENERAL, ExampleKind.NEGATIVE]
    batch = pad_batches(_examples(kinds, seed=3), max_tokens=10_000)[0]
    ce, kl, positions, batch_kinds = answer_losses(model, batch, teacher=Teacher(model))
    expected = _reference_kl_sum(model, batch)
    assert expected > 1e-3  # the moved adapters change the general answers' distributions
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-5)
    # cross-entropy covers exactly the answers of the other kinds
    assert int((batch_kinds != int(ExampleKind.GENERAL)).sum()) > 0
    assert ce > 0


def test_soft_target_loss_of_packed_rows_equals_that_of_padded_batches():
    model = _citi_model(seed=2)
    _move_adapters(model, seed=4)
    examples = _examples([ExampleKind.TOOL, ExampleKind.GENERAL, ExampleKind.GENERAL, ExampleKind.TOOL], seed=5)
    teacher = Teacher(model)
    _, kl_padded, _, _ = answer_losses(model, pad_batches(examples, max_tokens=10_000)[0], teacher=teacher)
    _, kl_packed, _, _ = answer_losses(model, pack_examples(examples, max_tokens=512)[0], teacher=teacher)
    torch.testing.assert_close(kl_packed, kl_padded, rtol=1e-4, atol=1e-5)


def test_soft_target_loss_is_zero_for_an_untouched_adapter_and_its_gradient_reaches_the_experts():
    model = _citi_model(seed=1)  # fresh: every B is zero and the UCO copies equal the base weights
    batch = pad_batches(_examples([ExampleKind.GENERAL] * 3, seed=2), max_tokens=10_000)[0]
    ce, kl, _, _ = answer_losses(model, batch, teacher=Teacher(model))
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    assert float(ce) == 0.0  # no tool answers in the batch
    _move_adapters(model, seed=9)
    _, kl, _, _ = answer_losses(model, batch, teacher=Teacher(model))
    kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if "molora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_teacher_pass_leaves_what_trains_unchanged():
    model = _citi_model()
    for n, p in model.named_parameters():
        p.requires_grad_("molora_router" in n)
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    batch = pad_batches(_examples([ExampleKind.GENERAL, ExampleKind.TOOL], seed=1), max_tokens=10_000)[0]
    answer_losses(model, batch, teacher=Teacher(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before


def _mean_backbone_gate(model, batch, where):
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    gates = [layer.router_probs["default"][..., 0] for layer in molora_layers(model)]
    return float(torch.stack([g[where] .mean() for g in gates]).mean())


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_token_routing_objective_moves_the_backbone_gate_up_on_general_and_down_on_tool_call_tokens(gate):
    torch.manual_seed(0)
    model = _citi_model(seed=3, gate=gate)
    kinds = [ExampleKind.GENERAL, ExampleKind.TOOL] * 3
    batch = pad_batches(_examples(kinds, seed=7), max_tokens=10_000)[0]
    from citi_engine.losses import label_positions

    positions, _ = label_positions(batch["labels"])
    token_kinds = batch["token_kind"].reshape(-1)[positions]
    target = backbone_targets(batch["token_kind"], positions, token_kinds)
    general, tool_call = target == 1.0, target == 0.0
    assert general.any() and tool_call.any()
    with torch.no_grad():
        g0, t0 = _mean_backbone_gate(model, batch, general), _mean_backbone_gate(model, batch, tool_call)
    routers = [p for n, p in model.named_parameters() if "molora_router" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in routers:
        p.requires_grad_(True)
    opt = torch.optim.Adam(routers, lr=0.05)
    for _ in range(8):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = token_routing_loss(model, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        g1, t1 = _mean_backbone_gate(model, batch, general), _mean_backbone_gate(model, batch, tool_call)
    assert g1 > g0 + 0.2 and t1 < t0 - 0.1, (g0, g1, t0, t1)


def _router_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return [p.grad for n, p in model.named_parameters() if "molora_router" in n]


def test_detached_routers_take_no_gradient_from_the_answer_loss_and_all_of_it_from_the_routing_objective():
    model = _citi_model(seed=5)
    _move_adapters(model, seed=2)
    batch = pad_batches(_examples([ExampleKind.GENERAL, ExampleKind.TOOL] * 2, seed=4), max_tokens=10_000)[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        attached = model(**inputs).logits
    detach_routers(model, True)
    out = model(**inputs).logits
    torch.testing.assert_close(out, attached)  # the same forward, only the gradient's path changes
    answer = out.float().logsumexp(-1).mean()
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in _router_grads(model, answer))
    experts = [p.grad for n, p in model.named_parameters() if "molora_A" in n]
    assert experts and all(g is not None and g.abs().sum() > 0 for g in experts)
    from citi_engine.losses import label_positions

    positions, _ = label_positions(batch["labels"])
    target = backbone_targets(batch["token_kind"], positions, batch["token_kind"].reshape(-1)[positions])
    routed = _router_grads(model, token_routing_loss(model, target))
    assert routed and all(g is not None and g.abs().sum() > 0 for g in routed)
    detach_routers(model, False)
    model(**inputs)
    assert any(g is not None and g.abs().sum() > 0
               for g in _router_grads(model, model(**inputs).logits.float().logsumexp(-1).mean()))


def test_routers_reading_a_detached_input_train_only_their_own_weights_from_the_routing_objective():
    model = _citi_model(seed=5)
    _move_adapters(model, seed=2)
    batch = pad_batches(_examples([ExampleKind.GENERAL, ExampleKind.TOOL] * 2, seed=4), max_tokens=10_000)[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    from citi_engine.losses import label_positions

    positions, _ = label_positions(batch["labels"])
    target = backbone_targets(batch["token_kind"], positions, batch["token_kind"].reshape(-1)[positions])

    def grads_of_routing_objective():
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits
        token_routing_loss(model, target).backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if "molora_" in n}

    attached_logits, attached = grads_of_routing_objective()
    # The paper's way: the routing objective reaches the experts of the layers below through their output.
    assert any(g is not None and g.abs().sum() > 0 for n, g in attached.items() if "molora_A" in n)
    detach_routers(model, False, inputs=True)
    logits, detached = grads_of_routing_objective()
    torch.testing.assert_close(logits, attached_logits)  # the same forward
    assert all(g is None or float(g.abs().sum()) == 0.0 for n, g in detached.items() if "molora_router" not in n)
    routers = [g for n, g in detached.items() if "molora_router" in n]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)
    # The answer loss still trains everything (the experts' path to the input is untouched).
    model.zero_grad(set_to_none=True)
    model(**inputs).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "molora_A" in n)
    detach_routers(model, False)


def test_routing_detach_without_the_token_objective_is_refused_with_the_fix():
    from citi_engine.ranges import SettingError
    from citi_engine.training.config import Hyperparameters

    with pytest.raises(SettingError, match="routing_token_weight above 0") as caught:
        Hyperparameters(routing_detach=True, routing_token_weight=0.0)
    assert caught.value.param == "hyperparameters.routing_detach"
    with pytest.raises(SettingError, match="true or false"):
        Hyperparameters(routing_detach="yes")
    with pytest.raises(SettingError, match="routing_detach_input must be true or false") as caught:
        Hyperparameters(routing_detach_input=1)
    assert caught.value.param == "hyperparameters.routing_detach_input"
    with pytest.raises(SettingError, match="routing_balance must be one of sum, mean") as caught:
        Hyperparameters(routing_balance="avg")
    assert caught.value.param == "hyperparameters.routing_balance"
    with pytest.raises(SettingError, match="routing_gate must be one of softmax, sigmoid") as caught:
        Hyperparameters(routing_gate="relu")
    assert caught.value.param == "hyperparameters.routing_gate"
    assert Hyperparameters(routing_detach=True).routing_token_weight > 0


def test_the_paper_preset_lays_the_papers_settings_under_the_jobs_own():
    from citi_engine.training.config import FinetuneConfig

    paths = {"model": "m", "training_file": "tools.jsonl", "out_dir": "out"}
    ours = FinetuneConfig(**paths).hyperparameters
    paper = FinetuneConfig(**paths, preset="paper", hyperparameters={"lr_molora": 5e-4})
    hp = paper.hyperparameters
    # where our defaults differ from the paper, the preset takes the paper's
    assert (ours.routing_balance, hp.routing_balance) == ("mean", "sum")
    assert hp.routing_gate == "softmax"  # the paper's one softmax, whatever the job's default
    assert (ours.general_loss, hp.general_loss) == ("kl", "ce")
    assert ours.negatives_ratio > 0 and hp.negatives_ratio == 0
    assert hp.routing_beta == 0.01 and hp.routing_token_weight == 0
    assert (paper.components.alpha, paper.components.molora_fraction) == (2.0, 0.20)
    assert hp.lr_molora == 5e-4  # a setting given explicitly wins over the preset
    with pytest.raises(ValueError, match="unknown preset 'papr': use one of paper"):
        FinetuneConfig(**paths, preset="papr")


def test_backbone_targets_mark_general_tokens_one_tool_call_writers_zero_and_the_rest_unset():
    kinds = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]])
    positions = torch.tensor([1, 4, 5, 6])
    target = backbone_targets(kinds, positions, kinds.reshape(-1)[positions])
    assert target.tolist() == [[1, 1, 1, -1, 0, 0, -1, -1]]


# ----------------------------------------------------------------------------------------- negatives


def _tool_examples():
    lines = [json.loads(line) for line in open("examples/tools_train.jsonl", encoding="utf-8")]
    return [e for e in lines if any(m.get("tool_calls") for m in e["messages"])]


def test_negatives_never_offer_the_called_function_and_validate():
    from citi_engine.data.augment import build_negatives
    from citi_engine.data.validate import validate_jsonl

    examples = _tool_examples()
    assert len(examples) >= 10
    negatives = build_negatives(examples, 1.0, seed=0)
    assert len(negatives) >= len(examples) // 2
    by_request = {json.dumps(e["messages"][:1]): e for e in examples}
    for neg in negatives:
        offered = {t["function"]["name"] for t in neg["tools"]}
        assert neg["tools"], "a negative offers tools (else it teaches nothing about irrelevance)"
        answer = neg["messages"][-1]
        assert answer["role"] == "assistant" and not answer.get("tool_calls") and answer["content"]
        source = next((e for k, e in by_request.items() if json.loads(k) == neg["messages"][:1]), None)
        assert source is not None, "a negative keeps a request of the user's own data"
        called = {c["function"]["name"] for m in source["messages"] for c in m.get("tool_calls") or []}
        assert not offered & called
    text = "\n".join(json.dumps(n) for n in negatives).encode()
    report = validate_jsonl(text, min_examples=1)
    assert report.ok, report.problems[:3]


def test_negatives_are_the_same_for_the_same_seed_and_none_at_ratio_zero():
    from citi_engine.data.augment import build_negatives

    examples = _tool_examples()
    assert build_negatives(examples, 0.5, seed=3) == build_negatives(examples, 0.5, seed=3)
    assert build_negatives(examples, 0.0, seed=3) == []


def test_near_miss_negatives_offer_the_closest_other_tools_never_the_called_function_and_validate():
    from citi_engine.data.augment import _words, build_negatives
    from citi_engine.data.validate import validate_jsonl

    examples = _tool_examples()
    near = build_negatives(examples, 1.0, seed=0, near=1.0)
    plain = build_negatives(examples, 1.0, seed=0)
    assert len(near) == len(plain) and near != plain
    assert validate_jsonl("\n".join(json.dumps(n) for n in near).encode(), min_examples=1).ok

    def shared(neg):  # words the request shares with the offered tools' names and descriptions
        tools = [(t["function"]["name"], t["function"].get("description")) for t in neg["tools"]]
        return len(_words(neg["messages"][:-1]) & _words(tools))

    for neg in near:
        source = next(e for e in examples if e["messages"][:1] == neg["messages"][:1])
        called = {c["function"]["name"] for m in source["messages"] for c in m.get("tool_calls") or []}
        assert neg["tools"] and not {t["function"]["name"] for t in neg["tools"]} & called
    assert sum(map(shared, near)) > sum(map(shared, plain))


def test_function_masking_renames_functions_and_parameters_consistently():
    from citi_engine.data.augment import mask_functions
    from citi_engine.data.validate import validate_jsonl

    example = next(e for e in _tool_examples() if any(t["function"].get("parameters", {}).get("properties")
                                                        for t in e["tools"]))
    masked = mask_functions(example, random.Random(0))
    tools = {t["function"]["name"]: t["function"] for t in masked["tools"]}
    original = {t["function"]["name"] for t in example["tools"]}
    assert not set(tools) & original
    for m in masked["messages"]:
        for call in m.get("tool_calls") or []:
            fn = tools[call["function"]["name"]]  # every call names a masked tool
            args = json.loads(call["function"]["arguments"])
            assert set(args) <= set(fn["parameters"]["properties"])
    assert validate_jsonl(json.dumps(masked).encode(), min_examples=1).ok
