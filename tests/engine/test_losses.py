"""Chunked cross-entropy: the same value and gradients as the plain loss, without the full logits."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from citi_engine.losses import causal_lm_loss, label_positions, linear_cross_entropy
from citi_engine.packing import IGNORE_INDEX, pack_examples, pad_batches
from citi_engine.testing import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 300


def _tiny_llama(tie=False, seed=0):
    return tiny_llama(vocab_size=VOCAB, hidden=64, intermediate=128, max_positions=512, seed=seed,
                      attn_implementation="sdpa", use_cache=False, tie_word_embeddings=tie).train()


def _examples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        cut = rng.randrange(1, n - 2)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:], "task_type": 1})
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_equals_plain_cross_entropy_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, reduction="mean")
    gh, gw = torch.autograd.grad(got * 3.0, [hidden, weight])
    want = F.cross_entropy(hidden @ weight.T, targets)
    wh, ww = torch.autograd.grad(want * 3.0, [hidden, weight])
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, wh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, ww, atol=1e-6, rtol=1e-5)


def test_linear_cross_entropy_bf16_tracks_the_fp32_loss_and_skips_frozen_weight_grads():
    torch.manual_seed(1)
    hidden = torch.randn(40, 64).bfloat16().requires_grad_(True)
    weight = torch.randn(200, 64).div(8).bfloat16()  # frozen head
    targets = torch.randint(0, 200, (40,))
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert got.dtype == torch.float32
    got.backward()
    assert weight.grad is None and hidden.grad.dtype == torch.bfloat16
    want = F.cross_entropy(hidden.float() @ weight.float().T, targets, reduction="sum")
    assert abs(got.item() - want.item()) < 0.01 * abs(want.item())


def test_linear_cross_entropy_without_grad_builds_no_gradient_buffers():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 20, (10,)))
    assert not loss.requires_grad


def test_linear_cross_entropy_under_autocast_runs_matmuls_in_the_autocast_dtype():
    torch.manual_seed(2)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)  # fp32 master weights, as in mixed precision
    targets = torch.randint(0, 30, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets)
        want = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    got.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert abs(got.item() - want.item()) < 0.02 * abs(want.item())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("layout", ["packed", "padded", "contract"])
def test_causal_lm_loss_equals_the_models_own_loss_in_value_and_every_gradient(tie, layout):
    model = _tiny_llama(tie=tie)
    model.train()
    examples = _examples([40, 17, 60, 25], seed=3)
    if layout == "packed":
        batch = pack_examples(examples, max_tokens=160)[0]
    else:
        batch = pad_batches(examples, max_tokens=160)[0]
        if layout == "contract":  # the plain contract batch: positions found from the labels
            batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "task_type")}

    loss, count = causal_lm_loss(model, batch, chunk_size=16)
    got = torch.autograd.grad(loss, list(model.parameters()))
    kwargs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "use_cache": False}
    if layout == "packed":
        kwargs["position_ids"] = batch["position_ids"]
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    want_loss = model(**kwargs).loss
    want = torch.autograd.grad(want_loss, list(model.parameters()))

    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4, msg=name)


def test_causal_lm_loss_through_a_peft_lora_model_trains_only_the_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    batch = pack_examples(_examples([30, 50], seed=4), max_tokens=96)[0]
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    want = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
    ).loss
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


def test_causal_lm_loss_with_a_wrapped_head_runs_the_wrappers_forward():
    """LoRA on the output head: the head's own forward must run, not its frozen weight."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    batch = pack_examples(_examples([30, 50], seed=5), max_tokens=96)[0]
    loss, _ = causal_lm_loss(model, batch, chunk_size=8)
    want = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
    ).loss
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_label_positions_skip_the_last_column_and_unlabelled_targets():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    positions, targets = label_positions(labels)
    assert positions.tolist() == [0, 1, 5, 6]
    assert targets.tolist() == [5, 6, 7, 8]


def test_training_loss_accumulated_over_micro_batches_equals_one_big_batch():
    """Dividing each micro-batch's summed CE by the step's label count makes accumulation exact."""
    from citi_engine.losses import training_loss

    model = _tiny_llama()
    examples = _examples([40, 17, 60, 25, 33], seed=7)
    rows = pack_examples(examples, max_tokens=80)
    assert len(rows) >= 2
    step_labels = sum(r["num_label_tokens"] for r in rows)
    accumulated = sum(training_loss(model, r, label_tokens=step_labels)[0] for r in rows)
    whole, _ = causal_lm_loss(model, pad_batches(examples, max_tokens=10_000)[0])
    torch.testing.assert_close(accumulated, whole, atol=1e-5, rtol=1e-5)


def test_training_loss_adds_the_routing_loss_for_packed_and_padded_batches():
    from citi_engine.adapter import apply_method, routing_loss
    from citi_engine.components import list_components
    from citi_engine.losses import training_loss

    model = _tiny_llama()
    names = list_components(model)
    model = apply_method(model, "citi", molora=names[::5], num_experts=2, rank=2, alpha=4)
    examples = _examples([30, 12, 41], seed=8)
    for batch in (pack_examples(examples, max_tokens=96)[0], pad_batches(examples, max_tokens=96)[0]):
        total, ce, rl = training_loss(model, batch, routing_beta=0.5)
        mask = batch.get("sequence_mask", batch.get("attention_mask"))
        torch.testing.assert_close(rl, routing_loss(model, batch["task_type"], mask))
        torch.testing.assert_close(total, ce + 0.5 * rl)
