"""Sequence packing: rows of several examples that behave exactly like the examples run alone."""

from __future__ import annotations

import os
import random

import pytest
import torch

from citi_engine import packing
from citi_engine.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    collate_packed,
    enable_varlen_attention,
    model_inputs,
    pack_examples,
    pad_batches,
    padding_fraction,
    plan_packing,
    reference_varlen_attention,
    varlen_attention_forward,
)
from citi_engine.testing import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256


def _examples(lengths, seed=0, label_tail=0.4):
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        cut = int(n * (1 - label_tail))
        labels = [IGNORE_INDEX] * cut + ids[cut:]
        out.append({"input_ids": ids, "labels": labels, "task_type": i % 2})
    return out


def _tiny_llama(seed=0):
    return tiny_llama(vocab_size=VOCAB, hidden=64, intermediate=128, max_positions=512, seed=seed,
                      attn_implementation="sdpa", use_cache=False)


def test_plan_packing_fills_rows_without_splitting_or_losing_examples():
    lengths = [300, 20, 250, 120, 400, 60, 90, 10, 500, 33]
    rows = plan_packing(lengths, 512)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # first-fit decreasing needs no more rows than ceil(total / capacity) + 1 here
    assert len(rows) <= -(-sum(lengths) // 512) + 1


def test_packed_row_restarts_positions_and_masks_boundaries():
    examples = _examples([5, 7, 3])
    for e in examples:
        e["labels"] = list(e["input_ids"])  # every token labelled, so boundaries show
    batch = collate_packed(examples, pad_id=0, row_length=20)
    assert batch["input_ids"].shape == (1, 20)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1, 2, 3, 4]
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[5] == labels[12] == IGNORE_INDEX  # first token of every example
    assert labels[15:] == [IGNORE_INDEX] * 5  # the padding tail
    assert batch["cu_seq_lens"].tolist() == [0, 5, 12, 15, 20]
    assert batch["max_seq_len"] == 7
    assert batch["num_tokens"] == 15
    assert batch["task_type"].tolist() == [0, 1, 0]
    assert batch["sequence_mask"].sum(1).tolist() == [5, 7, 3]
    # a position predicts the next token only inside its example: 4+6+2 targets
    assert batch["num_label_tokens"] == 12
    positions = batch["loss_positions"].tolist()
    assert 4 not in positions and 11 not in positions and 14 not in positions
    flat_ids = batch["input_ids"][0]
    assert batch["loss_targets"].tolist() == flat_ids[[p + 1 for p in positions]].tolist()


def test_example_longer_than_a_micro_batch_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="raise max_tokens or lower max_length"):
        pack_examples(_examples([10, 600]), max_tokens=512)


@pytest.mark.parametrize("fixed_length", [True, False])
def test_packed_logits_equal_per_example_logits_under_sdpa(fixed_length):
    model = _tiny_llama()
    examples = _examples([37, 11, 64, 5, 90, 23], seed=1)
    batches = pack_examples(examples, max_tokens=128, fixed_length=fixed_length, pad_to_multiple_of=16)
    assert len(batches) >= 2
    seen = 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**model_inputs(batch)).logits[0]
            bounds = batch["cu_seq_lens"].tolist()
            for s in range(batch["task_type"].numel()):
                start, end = bounds[s], bounds[s + 1]
                alone = torch.tensor([batch["input_ids"][0, start:end].tolist()])
                ref = model(input_ids=alone, use_cache=False).logits[0]
                torch.testing.assert_close(logits[start:end], ref, atol=2e-5, rtol=1e-4)
                seen += 1
    assert seen == len(examples)


def test_packed_rows_leak_without_restarting_positions():
    """The equality above is not vacuous: a plain causal row (positions 0..T-1) changes the logits."""
    model = _tiny_llama()
    batch = pack_examples(_examples([30, 30], seed=2), max_tokens=64, fixed_length=False, pad_to_multiple_of=4)[0]
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0, 30:60]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 30:60]
        alone = model(input_ids=batch["input_ids"][:, 30:60], use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)
    assert (leaky - alone).abs().max() > 1e-3


def test_padded_batches_keep_the_token_budget_and_match_per_example_logits():
    model = _tiny_llama()
    examples = _examples([37, 11, 64, 5, 90, 23, 50], seed=3)
    batches = pad_batches(examples, max_tokens=128)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(examples)
    assert all(b["num_tokens"] <= 128 for b in batches)
    assert padding_fraction(batches) > 0.0
    packed = pack_examples(examples, max_tokens=128, fixed_length=False, pad_to_multiple_of=1)
    assert padding_fraction(packed) == 0.0
    with torch.no_grad():
        b = batches[0]
        logits = model(**model_inputs(b)).logits
        for row in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][row].sum())
            ref = model(input_ids=b["input_ids"][row : row + 1, :n], use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, :n], ref, atol=2e-5, rtol=1e-4)


def test_reference_varlen_attention_matches_a_block_diagonal_causal_mask():
    torch.manual_seed(0)
    lengths = [3, 9, 1, 6]
    total = sum(lengths)
    q, k, v = torch.randn(total, 4, 8), torch.randn(total, 2, 8), torch.randn(total, 2, 8)
    cu = torch.tensor([0, 3, 12, 13, 19], dtype=torch.int32)
    out = reference_varlen_attention(q, k, v, cu, 9, 8**-0.5)
    seg = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    idx = torch.arange(total)
    mask = (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=mask, scale=8**-0.5,
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_varlen_attention_in_the_model_matches_sdpa_packing_and_padded_batches():
    model = _tiny_llama()
    examples = _examples([37, 11, 64, 5, 90, 23], seed=4)
    packed = pack_examples(examples, max_tokens=128)
    padded = pad_batches(examples, max_tokens=128)
    with torch.no_grad():
        want_packed = [model(**model_inputs(b)).logits for b in packed]
        want_padded = [model(**model_inputs(b)).logits for b in padded]
    assert enable_varlen_attention(model) == "sdpa"  # no fast kernel on CPU: left as it was
    assert "no fast variable-length kernel" in model.citi_varlen_skipped
    kernel = packing._KERNEL["fn"]
    try:
        assert enable_varlen_attention(model, allow_reference=True) == f"{VARLEN_ATTENTION}:reference"
        assert model.config._attn_implementation == VARLEN_ATTENTION
        calls = []
        kernel = packing._KERNEL["fn"]
        packing._KERNEL["fn"] = lambda *a: calls.append(a[3].tolist()) or kernel(*a)
        with torch.no_grad():
            for b, want in zip(packed, want_packed, strict=True):
                torch.testing.assert_close(model(**model_inputs(b)).logits, want, atol=2e-5, rtol=1e-4)
                # without the boundaries it reads them from the restarting positions
                inputs = model_inputs(b)
                for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
                    inputs.pop(key)
                torch.testing.assert_close(model(**inputs).logits, want, atol=2e-5, rtol=1e-4)
            for b, want in zip(padded, want_padded, strict=True):
                got = model(**model_inputs(b)).logits
                real = b["attention_mask"].bool()
                torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
        # the packed rows went through the kernel (once per layer per forward), the padded ones did not
        assert len(calls) == 2 * 2 * len(packed)
        assert calls[0] == packed[0]["cu_seq_lens"].tolist()
    finally:
        packing._KERNEL["fn"] = kernel
        model.set_attn_implementation("sdpa")


def test_varlen_attention_gradients_match_sdpa_packing():
    model = _tiny_llama()
    batch = pack_examples(_examples([40, 17, 60], seed=5), max_tokens=128)[0]

    def grads():
        model.zero_grad()
        out = model(**model_inputs(batch)).logits
        out.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    want = grads()
    enable_varlen_attention(model, allow_reference=True)
    try:
        got = grads()
    finally:
        model.set_attn_implementation("sdpa")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_varlen_attention_forward_refuses_nothing_it_cannot_do():
    """Decoding shapes (query shorter than keys) go through SDPA untouched."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 2
    module.is_causal = True
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    got, _ = varlen_attention_forward(module, q, k, v, None, position_ids=torch.tensor([[4]]))
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(got, want)


def test_routing_loss_of_a_packed_row_equals_that_of_the_same_examples_padded():
    """Per-example sums over a packed row use ``sequence_mask`` where a padded batch uses its attention mask."""
    from citi_engine.adapter import apply_method, routing_loss
    from citi_engine.components import list_components

    model = _tiny_llama()
    names = list_components(model)
    model = apply_method(model, "citi", molora=names[::5], uco=names[2::10], num_experts=2, rank=2, alpha=4)
    examples = _examples([30, 12, 41], seed=6)
    packed = pack_examples(examples, max_tokens=96)[0]
    padded = pad_batches(examples, max_tokens=96)[0]
    assert packed["task_type"].tolist() == padded["task_type"].tolist() == [0, 1, 0]
    with torch.no_grad():
        model(**model_inputs(packed))
        got = routing_loss(model, packed["task_type"], packed["sequence_mask"])
        model(**model_inputs(padded))
        want = routing_loss(model, padded["task_type"], padded["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shard_splits_batches_evenly_across_processes():
    """Every data-parallel process gets the same number of micro-batches (else DDP waits forever)."""
    from citi_engine.distributed import DistInfo, shard

    batches = list(range(11))
    parts = [shard(batches, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert shard(batches, DistInfo()) == batches
    with pytest.raises(ValueError, match="give more data"):
        shard([1], DistInfo(rank=0, world_size=2))
