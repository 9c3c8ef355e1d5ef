"""Router separation: does a CITI adapter switch its experts off for general input and on for tool calls?

The diagnostic behind the method's promise. MOLoRA's backbone gate G(x)[0] takes router mass away from the
experts; a router that does its job gives it about 1 on general tokens (experts off: the base model's
behaviour) and about 0 on the tokens that write a tool call. Measured teacher-forced, by layer and overall:

- general tokens: every token of a general probe prompt and of the base model's answer to it, without and
  with unrelated tools offered (measured inside :mod:`.retention`'s KL pass, no extra forward);
- tool-call tokens: the positions that write the ground-truth calls of the tool test cases (:func:`tool_call_gates`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from citi_engine.evaluate.tool_eval import ToolCase


def tool_call_gates(model, tokenizer, cases: Sequence[ToolCase], *, batch_size: int = 8, max_length: int = 4096,
                    limit: int | None = None, chunk: int | None = None) -> dict | None:
    """Mean backbone gate over the positions that write each case's ground-truth call(s), teacher-forced.

    ``{"mean", "per_layer", "tokens", "cases"}`` (see :class:`~citi_engine.adapter.GateMeter`), or None for
    a model without MOLoRA layers. Cases without a call (irrelevance) are skipped; ``limit`` caps the cases. ``chunk``: columns a forward
    takes (default :func:`~citi_engine.generate.prefill_chunk_for` the batch).
    """
    from citi_engine.adapter import GateMeter
    from citi_engine.data.chat_format import encode_example
    from citi_engine.generate import eval_mode, forward_in_chunks, model_device, prefill_chunk_for
    from citi_engine.training.batches import collate

    meter = GateMeter(model)
    if not meter.layers:
        return None
    examples = [e for e in (c.gold_example() for c in cases) if e is not None][:limit]
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    encoded = [e for e in encoded if not e["truncated"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size], pad)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            writes = torch.zeros_like(batch["labels"], dtype=torch.bool)
            writes[:, :-1] = batch["labels"][:, 1:] != -100  # position t writes answer token t+1
            # Only the routers are read: one position of logits a forward, and the rows go through in chunks of
            # columns with a KV cache (right padding: every real token sees what it would in one forward), so
            # no batch x length x length mask is built for examples of up to max_length tokens.
            for start, end, _, _ in forward_in_chunks(model, ids, mask, chunk=chunk or prefill_chunk_for(len(ids))):
                meter.add(writes[:, start:end])
    return {**meter.result(), "cases": len(encoded)}


def separation(general: dict | None, general_with_tools: dict | None, tool_call: dict | None) -> dict | None:
    """The three gate measurements side by side, with the headline means (None without MOLoRA)."""
    if general is None and general_with_tools is None and tool_call is None:
        return None

    def mean(d: dict | None) -> float | None:
        return d.get("mean") if d else None

    return {
        "backbone_gate_general": mean(general),
        "backbone_gate_general_with_tools": mean(general_with_tools),
        "backbone_gate_tool_call": mean(tool_call),
        "general": general,
        "general_with_tools": general_with_tools,
        "tool_call": tool_call,
    }
