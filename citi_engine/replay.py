"""General replay: general examples written by the base model itself, for jobs that bring none.

CITI's routing loss needs both task types in every stage: tool examples pull tool tokens onto the
experts, general examples push general tokens onto the backbone neuron. When a job brings no general
data, the base model answers a sample of built-in general prompts greedily, and those answers
become the general examples (self-distillation: training on them keeps the tuned model close to the
base model on general requests, instead of teaching it anything new).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from citi_engine.errors import Cancelled, CitiError


def sample_prompts(prompts: Sequence[str], count: int, seed: int) -> list[str]:
    """``min(count, len(prompts))`` distinct prompts, in a fixed order for a given seed."""
    pool = list(prompts)
    if count >= len(pool):
        return pool
    return random.Random(seed).sample(pool, count)


def build_replay(
    model,
    tokenizer,
    prompts: Sequence[str] | None = None,
    *,
    count: int = 128,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    should_cancel: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    tool_lists: Sequence[list[dict]] = (),
    decode: str = "dynamic",
) -> list[dict]:
    """Let ``model`` answer ``count`` general prompts greedily; return them as training examples.

    ``prompts`` defaults to :data:`citi_engine.data.prompts.REPLAY_PROMPTS` (disjoint from the probe
    prompts that measure retention, so evaluation never tests on replayed answers). Each example is
    ``{"messages": [user, assistant]}`` (task type 0). Answers the model left empty are dropped.
    ``should_cancel`` is checked before every batch and every generated token (raises
    :class:`~citi_engine.errors.Cancelled`); ``on_progress(done, total)`` follows each batch.

    ``tool_lists`` offers the k-th list of tools with the k-th chosen prompt (the prompts are in a seeded random
    order, so which prompts get tools is random too): the model answers with those tools in its prompt, and the
    example keeps them, marked general (``citi_kind``) since no tool is called. An answer that calls a tool
    anyway is not a general answer: that example is left out. ``decode``: the decode loop's KV cache
    (:func:`citi_engine.generate.generate_ids`).
    """
    from citi_engine.data.chat_format import parse_tool_calls
    from citi_engine.data.schemas import KIND_KEY
    from citi_engine.generate import generate_chat

    if prompts is None:
        from citi_engine.data.prompts import REPLAY_PROMPTS

        prompts = REPLAY_PROMPTS
    chosen = sample_prompts(prompts, count, seed)
    examples: list[dict] = []
    total = len(chosen)
    for start in range(0, total, batch_size):
        if should_cancel is not None and should_cancel():
            raise Cancelled("the job was cancelled while building general replay data")
        batch = chosen[start:start + batch_size]
        tools = [tool_lists[k] if k < len(tool_lists) else None for k in range(start, start + len(batch))]
        conversations = [{"messages": [{"role": "user", "content": p}], "tools": t} for p, t in zip(batch, tools,
                                                                                                 strict=True)]
        replies = generate_chat(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, temperature=0.0, should_cancel=should_cancel, decode=decode)
        for prompt, offered, reply in zip(batch, tools, replies, strict=True):
            answer = (reply.text or "").strip()
            if not answer:
                continue
            example: dict = {"messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}]}
            if offered:
                if parse_tool_calls(answer)[1]:
                    continue
                example.update({"tools": offered, KIND_KEY: "general"})
            examples.append(example)
        if on_progress is not None:
            on_progress(min(start + batch_size, total), total)
    if not examples:
        raise CitiError(
            "the base model answered none of the replay prompts (every answer was empty); pass general examples "
            "with general_file instead",
            code="replay_failed",
        )
    return examples

