"""Decode attention over grouped key/value heads (citi_engine.decode_attention): the same attention as over keys and
values repeated per query head, computed without that copy; the served model's replies and logits unchanged."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from citi_engine import testing  # noqa: E402
from citi_engine.decode_attention import (  # noqa: E402
    DECODE_ATTENTION,
    decode_attention,
    grouped_decode_attention,
)
from citi_engine.models import load_model  # noqa: E402
from citi_engine.static_decode import StaticDecoder  # noqa: E402


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from the module calling them."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference(query, key, value, mask, scale):
    """Attention with every key/value head repeated for the query heads of its group, in float64."""
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scores = (query.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # rows x queries x heads x dim


def _inputs(rows=3, heads=8, kv_heads=2, queries=1, columns=11, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, queries, dim, generator=g)
    key = torch.randn(rows, kv_heads, columns, dim, generator=g)
    value = torch.randn(rows, kv_heads, columns, dim, generator=g)
    mask = torch.ones(rows, 1, queries, columns, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    mask[2, ..., :1] = False
    return query, key, value, mask


def test_one_query_token_attends_its_groups_keys_without_copying_them(monkeypatch):
    query, key, value, mask = _inputs()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out, weights = grouped_decode_attention(_Attention(4), query, key, value, mask, scaling=0.25)
    assert weights is None
    assert seen == [((3, 2, 4, 16), (3, 2, 11, 16))], "keys and values reach the kernel with their own 2 heads"
    torch.testing.assert_close(out.double(), _reference(query, key, value, mask, 0.25), rtol=1e-5, atol=1e-6)


def test_several_query_tokens_go_to_transformers_sdpa_unchanged():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value, mask = _inputs(queries=5)
    causal = torch.ones(5, 11, dtype=torch.bool).tril(diagonal=6)
    mask = mask & causal
    module = _Attention(4)
    out, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert torch.equal(out, want)
    torch.testing.assert_close(out.double(), _reference(query, key, value, mask, 0.25), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four query heads over two key/value heads."""
    model, tok = load_model(testing.make_tiny_model_dir(tmp_path_factory.mktemp("tiny")), device="cpu")
    testing.vary_weights(model)
    return model, tok


def _static_logits(model, prompts, steps=6):
    from citi_engine.generate import pad_left

    ids, mask = pad_left(prompts, 0, torch.device("cpu"))
    decoder = StaticDecoder(model, ids, mask, steps)
    logits = [decoder.prefill(0)]
    for _ in range(steps - 1):
        logits.append(decoder.step(logits[-1].argmax(-1).tolist()))
    return torch.stack(logits)


def test_static_decode_steps_attend_grouped_with_sdpas_logits_and_leave_the_model_as_it_was(tiny, monkeypatch):
    from citi_engine import decode_attention, static_decode

    model, _ = tiny
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 40000, (n,), generator=g).tolist() for n in (9, 4, 7)]  # left padding
    monkeypatch.setattr(static_decode, "GROUPED_ATTENTION", False)  # the attention before: transformers' sdpa
    with torch.no_grad():
        want = _static_logits(model, prompts)
    calls = []
    grouped = decode_attention.grouped_decode_attention

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return grouped(module, query, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "grouped_decode_attention", counted)
    monkeypatch.setattr(static_decode, "GROUPED_ATTENTION", True)
    with torch.no_grad():
        got = _static_logits(model, prompts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert calls == [1] * layers * 5, "every decode step, and only they (prefill stays on sdpa), attend grouped"
    assert model.config._attn_implementation == "sdpa"


def test_a_model_on_another_attention_is_left_as_it_is(tiny):
    model, _ = tiny
    model.set_attn_implementation("eager")
    try:
        with decode_attention(model) as used:
            assert used == "eager" and model.config._attn_implementation == "eager"
        with pytest.raises(RuntimeError), decode_attention(model):
            raise RuntimeError("a failed step")
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError), decode_attention(model) as used:
        assert used == DECODE_ATTENTION and model.config._attn_implementation == DECODE_ATTENTION
        raise RuntimeError("a failed step")
    assert model.config._attn_implementation == "sdpa", "restored however the block ends"
