"""Component listing and selection, and gradient-based importance on a tiny real Llama."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaForCausalLM  # noqa: E402

from citi_engine import testing  # noqa: E402
from citi_engine.components import component_info, list_components, select_components  # noqa: E402
from citi_engine.errors import Cancelled  # noqa: E402
from citi_engine.importance import (  # noqa: E402
    ImportanceProbe,
    ImportanceResult,
    compute_importance,
)

VOCAB = 96


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference loss: cross-entropy summed over the answer tokens (labels != -100), next-token shifted, from
    full logits (the engine's importance scoring computes it without them, through ``causal_lm_loss``)."""
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
PAD = 0


def tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0) -> LlamaForCausalLM:
    return testing.tiny_llama(vocab_size=VOCAB, seed=seed, dtype=dtype, pad_token_id=PAD, tie_word_embeddings=False)


def make_batch(lengths: list[int], width: int, *, seed: int = 1, task_type: int = 1, pad_noise: bool = False) -> dict:
    """Right-padded batch; the second half of every sequence is the answer (labels), the rest -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=g)
    input_ids = torch.full((len(lengths), width), PAD)
    if pad_noise:  # pad positions hold arbitrary tokens: masking must make them irrelevant
        input_ids = torch.randint(1, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(99))
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = ids[i, :n]
        attention_mask[i, :n] = 1
        labels[i, n // 2:n] = ids[i, n // 2:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "task_type": torch.full((len(lengths),), task_type)}


def test_components_are_listed_in_model_order():
    names = list_components(tiny_llama())
    order = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"model.layers.{layer}.{m}" for layer in range(2) for m in order]
    assert component_info("model.layers.1.self_attn.k_proj") == (1, "k_proj")
    with pytest.raises(ValueError, match="not a decoder-layer component"):
        component_info("lm_head")


def test_select_components_never_puts_one_component_in_both_sets():
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(10)]
    M = {n: float(i) for i, n in enumerate(names)}  # layers 9 and 8 are the most tool-important
    C = {n: float(i) for i, n in enumerate(names)}  # layers 0 and 1 are the least general-important
    C[names[9]] = -1.0  # ... but layer 9 ranks lowest on C too: it stays MOLoRA, UCO takes the next-lowest
    molora, uco = select_components(M, C, molora_fraction=0.2, uco_fraction=0.2)
    assert molora == [names[8], names[9]]
    assert uco == [names[0], names[1]]
    # A tiny fraction still selects one component; zero selects none.
    assert select_components(M, C, 0.01, 0.0) == ([names[9]], [])
    with pytest.raises(ValueError, match="lower one of the fractions"):
        select_components(M, C, 0.6, 0.5)


def test_random_selection_ignores_the_scores_and_follows_the_seed():
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(40)]
    M = {n: float(i) for i, n in enumerate(names)}
    C = {n: float(i) for i, n in enumerate(names)}
    ranked = select_components(M, C, 0.2, 0.1)
    drawn = select_components(M, C, 0.2, 0.1, selection="random", seed=3)
    assert drawn == select_components(M, C, 0.2, 0.1, selection="random", seed=3)  # reproducible
    assert drawn != select_components(M, C, 0.2, 0.1, selection="random", seed=4)
    assert drawn != ranked and [len(x) for x in drawn] == [len(x) for x in ranked] == [8, 4]
    assert not set(drawn[0]) & set(drawn[1])
    # reversed scores draw the same sets: the scores play no part
    flipped = {n: -v for n, v in M.items()}
    assert select_components(flipped, flipped, 0.2, 0.1, selection="random", seed=3) == drawn


def test_signed_hook_sum_equals_theta_dot_weight_gradient():
    model = tiny_llama(torch.float64)
    batch = make_batch([7, 5, 9], 9)
    names = list_components(model)
    with ImportanceProbe(model, names, signed=True) as probe:
        probe.step(batch)
    assert all(p.grad is None for p in model.parameters())

    # Reference: theta . grad_theta L from ordinary weight gradients (the linears have no bias).
    modules = dict(model.named_modules())
    assert all(modules[n].bias is None for n in names)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    answer_loss(out.logits, batch["labels"]).backward()
    for name in names:
        weight = modules[name].weight
        expected = (weight * weight.grad).sum()
        torch.testing.assert_close(probe.totals[name], expected, rtol=1e-9, atol=1e-12)


def test_importance_is_the_mean_of_per_token_absolute_values_over_real_tokens():
    model = tiny_llama(torch.float64)
    batch = make_batch([8, 4], 8)
    names = list_components(model)
    modules = dict(model.named_modules())

    # Independent path: retain_grad on every component output.
    outputs = {}

    def keep(name):
        def hook(_module, _inputs, output):
            output.retain_grad()
            outputs[name] = output

        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    answer_loss(out.logits, batch["labels"]).backward()
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].double()
    n_real = mask.sum()
    model.zero_grad(set_to_none=True)

    scores = compute_importance(model, {"tool": [batch]})
    some_tokens_cancel = False
    for name in names:
        per_token = (outputs[name] * outputs[name].grad).sum(-1)
        expected = ((per_token.abs() * mask).sum() / n_real).item()
        assert scores.T["tool"][name] == pytest.approx(expected, rel=1e-9)
        signed = abs((per_token * mask).sum().item()) / n_real.item()
        some_tokens_cancel |= signed < 0.9 * expected
    assert some_tokens_cancel, "the ranking must use per-token absolute values, not the absolute value of the sum"
    assert scores.n_examples == {"tool": 2}
    assert scores.n_tokens == {"tool": 12}


def test_padding_does_not_change_importance():
    model = tiny_llama(torch.float64)
    tight = compute_importance(model, {"tool": [make_batch([6, 8], 8)]})
    padded = compute_importance(model, {"tool": [make_batch([6, 8], 13, pad_noise=True)]})
    for name, value in tight.T["tool"].items():
        assert padded.T["tool"][name] == pytest.approx(value, rel=1e-9)
    assert padded.n_tokens == tight.n_tokens == {"tool": 14}


def test_compute_importance_stores_no_weight_gradient_and_restores_the_model():
    model = tiny_llama(torch.float32)
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    progress = []
    scores = compute_importance(model, {"tool": [make_batch([6, 5], 6), make_batch([4], 4, seed=3)],
                                        "replay": [make_batch([7], 7, seed=2, task_type=0)]},
                                on_progress=lambda done, total: progress.append((done, total)))
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert set(scores.T) == {"tool", "replay"}
    assert all(v > 0 for v in scores.T["tool"].values())
    assert not any(m._forward_hooks for m in model.modules())


def test_cancel_is_checked_every_batch_and_leaves_no_hooks():
    model = tiny_llama(torch.float32)
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 1

    batches = [make_batch([5], 5, seed=s) for s in range(4)]
    with pytest.raises(Cancelled):
        compute_importance(model, {"tool": batches}, should_cancel=should_cancel)
    assert len(calls) == 2
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_importance_result_normalises_selects_and_saves(tmp_path):
    model = tiny_llama(torch.float32)
    scores = compute_importance(model, {
        "tool": [make_batch([6, 7], 7, seed=1)],
        "replay": [make_batch([8, 5], 8, seed=2, task_type=0)],
        "code": [make_batch([6], 6, seed=3, task_type=0)],
    })
    result = ImportanceResult.from_scores(scores, molora_fraction=0.2, uco_fraction=0.1)
    assert sum(result.M.values()) == pytest.approx(1.0)
    assert sum(result.C.values()) == pytest.approx(2.0)  # two general sets, each normalised to 1
    assert len(result.molora) == 3 and len(result.uco) == 1  # 14 components: round(2.8)=3, round(1.4)=1
    assert not set(result.molora) & set(result.uco)
    top = sorted(result.M, key=result.M.get, reverse=True)[:3]
    assert set(result.molora) == set(top)

    json_path, png_path = result.save(tmp_path)
    doc = json.loads(json_path.read_text())
    assert set(doc) == {"components", "molora", "uco", "n_examples"}
    assert doc["n_examples"] == {"tool": 2, "general": 3}
    row = doc["components"][8]
    assert row["name"] == "model.layers.1.self_attn.k_proj" and row["layer"] == 1 and row["module"] == "k_proj"
    assert set(row["T"]) == {"tool", "general/replay", "general/code"}
    assert row["tool"] == pytest.approx(result.M[row["name"]])
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
    again = ImportanceResult.load(tmp_path)
    assert again.M == result.M and again.C == result.C and again.molora == result.molora and again.uco == result.uco
    assert again.T == result.T


def test_packed_batches_score_the_same_as_padded_ones():
    """Sequences packed into one row (attention kept inside each) give the same T_h as the same sequences padded."""
    from citi_engine.packing import pack_examples, pad_batches

    g = torch.Generator().manual_seed(5)
    examples = []
    for n in (7, 12, 9):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:], "task_type": 1})
    model = tiny_llama()
    packed = compute_importance(model, {"tool": pack_examples(examples, max_tokens=64, pad_id=PAD)})
    padded = compute_importance(model, {"tool": pad_batches(examples, max_tokens=64, pad_id=PAD)})
    assert packed.n_examples["tool"] == padded.n_examples["tool"] == 3
    for name, value in padded.T["tool"].items():
        assert packed.T["tool"][name] == pytest.approx(value, rel=1e-6), name
