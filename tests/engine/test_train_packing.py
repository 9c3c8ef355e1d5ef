"""Packed training batches: the same loss and gradients as padded batches, and whole jobs that pack."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from citi_engine.training.batches import answer_tokens, rank_share, step_batches  # noqa: E402
from citi_engine.training.config import FinetuneConfig  # noqa: E402
from tests.engine.test_train import _stage_setup, assert_same_adapter, small_config, tiny_model, write_data  # noqa: E402, F401


def _step_gradients(model, cfg, micro, examples, routing_loss):
    """The step's (cross-entropy, routing loss) and the gradient of every trained tensor."""
    from citi_engine.train import accumulate_gradients, step_loss_module

    model.zero_grad(set_to_none=True)
    module = step_loss_module(model, cfg, routing_loss=routing_loss, device=torch.device("cpu"),
                              frozen_dtype=torch.float32)
    ce, rl = accumulate_gradients(module, micro, n_answer=answer_tokens(examples), n_examples=len(examples))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return ce, rl, grads


def _molora_model(tiny_model, tmp_path):  # noqa: F811
    from citi_engine.adapter import set_trainable

    model, tokenizer, pool, cfg = _stage_setup(tiny_model, "citi", tmp_path)
    set_trainable(model, "molora")
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        generator = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "molora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model, tokenizer, pool, cfg


def _assert_same(a: tuple, b: tuple) -> None:
    ce_a, rl_a, grads_a = a
    ce_b, rl_b, grads_b = b
    assert ce_a == pytest.approx(ce_b, rel=1e-5)
    assert rl_a == pytest.approx(rl_b, rel=1e-5, abs=1e-9)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        # fp32 rounding of sums over the tensor's own scale (router and A share one matmul, whose reduction order
        # differs between a padded and a packed batch): about 1e-7 of the largest entry, so allow 1e-6 of it
        scale = float(grads_b[name].abs().max())
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=max(1e-7, 1e-6 * scale), msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_packed_row_gives_the_loss_routing_loss_and_gradients_of_the_padded_batch(tiny_model, tmp_path,  # noqa: F811
                                                                                 attention):
    """Tool and general examples in one row: answer-only cross-entropy, and the routing loss per example
    with its own task type, exactly as the padded micro-batch of the same examples. Under SDPA (a
    block-diagonal mask), and under the variable-length attention a GPU run packs with by default (here
    its reference kernel, which the GPU's flash kernel is checked against before it is used)."""
    from citi_engine.adapter import routing_loss
    from citi_engine.packing import VARLEN_ATTENTION, enable_varlen_attention

    model, tokenizer, pool, cfg = _molora_model(tiny_model, tmp_path)
    if attention == "varlen":
        assert enable_varlen_attention(model, allow_reference=True) == f"{VARLEN_ATTENTION}:reference"
    examples = pool[:3] + pool[6:9]  # 3 tool, 3 general
    padded = step_batches(examples, micro_size=6, pad_id=tokenizer.pad_token_id)
    packed = step_batches(examples, micro_size=6, pad_id=tokenizer.pad_token_id, pack_tokens=1024)
    assert len(padded) == len(packed) == 1
    assert packed[0]["input_ids"].shape[0] == 1 and sorted(packed[0]["task_type"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert padded[0]["input_ids"].numel() > packed[0]["input_ids"].numel()  # the padding packing removes

    want = _step_gradients(model, cfg, padded, examples, routing_loss)
    got = _step_gradients(model, cfg, packed, examples, routing_loss)
    assert want[1] > 0
    _assert_same(got, want)


def test_packed_rows_accumulate_to_the_padded_steps_cross_entropy_and_gradients(tiny_model, tmp_path):  # noqa: F811
    """However a step's examples are grouped (3 padded micro-batches, or rows of a token budget), every
    answer token of the step weighs the same."""
    model, tokenizer, pool, cfg = _molora_model(tiny_model, tmp_path)
    examples = pool[:4] + pool[6:8]
    padded = step_batches(examples, micro_size=2, pad_id=tokenizer.pad_token_id)
    packed = step_batches(examples, micro_size=2, pad_id=tokenizer.pad_token_id, pack_tokens=256)
    assert len(padded) == 3 and len(packed) >= 3
    _assert_same(_step_gradients(model, cfg, packed, examples, None),
                 _step_gradients(model, cfg, padded, examples, None))


def test_finetune_citi_with_packing_ends_with_the_padded_runs_adapter(tiny_model, tmp_path):  # noqa: F811
    """Packing changes the layout only: a whole citi job (importance, three stages) ends with the same
    adapter as the padded job, and the adapter loads. Cross-entropy on the general answers here: the soft
    targets' KL is checked equal packed and padded at the level of one step's gradients
    (test_soft_targets.py), since over a whole job Adam amplifies the float-order noise of its large
    logits on this random model past this test's tolerance."""

    from citi_engine.adapter import load_adapter
    from citi_engine.train import finetune

    data = write_data(tmp_path)
    results, events = {}, []
    for packing in (False, True):
        cfg = small_config(tiny_model, data, tmp_path / str(packing), budget={"max_steps": 4},
                           hyperparameters={"packing": packing, "general_loss": "ce"})
        results[packing] = finetune(cfg, on_event=events.append if packing else None)
    padded, packed = results[False], results[True]
    assert packed.steps == padded.steps == 4 and packed.trained_tokens == padded.trained_tokens
    assert packed.selected_components == padded.selected_components
    assert any("packed rows of at most 384 tokens" in e["message"] for e in events)
    assert_same_adapter(tmp_path / "False", tmp_path / "True", rtol=1e-4, atol=1e-6)
    model, _ = load_adapter(tmp_path / "True")
    assert sum(1 for n, _ in model.named_parameters() if "molora_router" in n) > 0


def test_packing_settings_are_checked_and_default_to_automatic():
    cfg = FinetuneConfig(training_file="t.jsonl", out_dir="o")
    assert cfg.hyperparameters.packing is None and cfg.hyperparameters.pack_tokens is None
    with pytest.raises(ValueError, match="pack_tokens=100 is less than max_length=2048"):
        FinetuneConfig(training_file="t.jsonl", out_dir="o", hyperparameters={"pack_tokens": 100})
    with pytest.raises(ValueError, match="packing must be true, false or null"):
        FinetuneConfig(training_file="t.jsonl", out_dir="o", hyperparameters={"packing": "yes"})


def _ex(n: int, task: int = 1) -> dict:
    return {"input_ids": [1] * n, "labels": [1] * n, "task_type": task}


def test_rank_share_gives_every_process_a_part_and_loses_no_example():
    step = [_ex(n) for n in (10, 50, 20, 40, 30, 60)]
    # Padded: whole micro-batches dealt in turn, the same micro-batches one process trains.
    shares = [rank_share(step, rank=r, world_size=2, micro_size=2) for r in range(2)]
    assert [[len(e["input_ids"]) for e in s] for s in shares] == [[10, 50, 30, 60], [20, 40]]
    # Fewer micro-batches than processes: the examples themselves are split.
    shares = [rank_share(step, rank=r, world_size=4, micro_size=6) for r in range(4)]
    assert [len(s) for s in shares] == [2, 2, 1, 1]
    # Packed: about the same number of tokens each.
    shares = [rank_share(step, rank=r, world_size=2, micro_size=2, balance_tokens=True) for r in range(2)]
    assert sorted(sum(len(e["input_ids"]) for e in s) for s in shares) == [100, 110]
    assert sorted(len(e["input_ids"]) for s in shares for e in s) == [10, 20, 30, 40, 50, 60]
    with pytest.raises(ValueError, match="at least the number of processes"):
        rank_share(step[:1], rank=0, world_size=2, micro_size=1)
