"""Attention for decode steps over grouped key/value heads, without a copy of the keys and values per query head.

Why: the serving runtime always passes an attention mask (left padding; the static decoder's 4-D mask), and with
a mask transformers' ``sdpa`` attention (5.17, the GPU host's) repeats every key/value head once for each query head
of its group before calling ``scaled_dot_product_attention``. In a decode step that copy is most of the
attention's memory traffic, and it grows with the rows: for the 1B shape (32 query heads over 8 key/value heads)
at 16 rows and a 490-column cache it writes 64 MB a layer, a gigabyte a step, which the attention then reads
again; at one row a sixteenth of that.

A decode step has one query token per row, so no copy is needed: a group's query heads are laid out as that
group's queries (rows x key/value heads x group size x head dim) and one ``scaled_dot_product_attention`` call
attends them to their own group's keys and values, the row's mask broadcast over the group. Prefill (several
query tokens), masks with a dimension per head and models without groups go to transformers' ``sdpa`` unchanged.
The result is the same attention (tests/engine/test_decode_attention.py pins it to the repeated form).

:func:`decode_attention` registers it with transformers under ``citi_sdpa`` (the mask is built as for ``sdpa``)
and switches a model to it for the length of a block: :class:`citi_engine.static_decode.StaticDecoder` wraps its
decode steps in it, so the static modes use it wherever they run (the server and the jobs' own evaluation alike,
so a job evaluated with ``cuda_graphs`` answers as the server in that mode does), and the dynamic mode, prefill
and training keep transformers' attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DECODE_ATTENTION = "citi_sdpa"


def grouped_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (rows x heads x queries x dim), ``key`` and
    ``value`` (rows x key/value heads x columns x dim); returns (rows x queries x heads x dim, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    mask_per_head = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    if queries != 1 or groups == 1 or mask_per_head or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Query head h reads key/value head h // groups (transformers' repeat_kv order), so a reshape lines each
    # group's query heads up as the queries of its key/value head.
    grouped = query.reshape(rows, kv_heads, groups, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                         dropout_p=dropout, scale=scaling)
    return out.reshape(rows, 1, heads, dim), None


@contextlib.contextmanager
def decode_attention(model: nn.Module) -> Iterator[str]:
    """Within the block, ``model`` (or the base of a peft model) attends with :func:`grouped_decode_attention`
    where it would use transformers' ``sdpa``; its configuration is restored on the way out. Yields the attention
    in use. A model on another attention (eager, a varlen or flash kernel) is left as it is: only ``sdpa``'s
    numerics are the same."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    if before != "sdpa":
        yield str(before)
        return
    AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    base.config._attn_implementation = DECODE_ATTENTION  # the layers read it at each forward
    try:
        yield DECODE_ATTENTION
    finally:
        base.config._attn_implementation = before
