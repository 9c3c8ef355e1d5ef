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

:func:`enable_decode_attention` registers it with transformers under ``citi_sdpa`` (the mask is built as for
``sdpa``) and switches a model to it; :class:`worker.inference.cache.ModelCache` does that in the static and
CUDA-graph decode modes (the dynamic mode keeps transformers' attention, the one the jobs' evaluation decodes with,
so its replies stay the evaluation's bit for bit).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("citi.decode_attention")

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


def enable_decode_attention(model: nn.Module) -> str:
    """Switch ``model`` (or the base of a peft model) from ``sdpa`` to :func:`grouped_decode_attention`; returns
    the attention implementation in use afterwards. Models on another attention (eager, a varlen or flash
    kernel) are left as they are: only ``sdpa``'s numerics are the same."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = str(getattr(base.config, "_attn_implementation", None))
    if current == DECODE_ATTENTION:
        return current
    if current != "sdpa":
        log.info("decode attention left as %s (only sdpa is replaced)", current)
        return current
    AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    try:
        base.set_attn_implementation(DECODE_ATTENTION)
    except (AttributeError, ValueError, TypeError) as exc:  # a transformers that refuses registered functions
        log.warning("decode attention not enabled, transformers refused it: %s", exc)
    return str(base.config._attn_implementation)
