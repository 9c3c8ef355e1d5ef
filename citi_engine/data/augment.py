"""Training data built from the job's own tool examples: irrelevance negatives and function masking.

- **Negatives** teach the model not to call a tool that is not there. From a tool example, take the request
  (the messages before its first call), offer a tool list that lacks every function the call needs (the
  called functions dropped from its own list, or tools taken from another example), and answer in plain text
  that no available tool fits. A model tuned on calls alone learns "tools offered -> call one"; these
  examples break that shortcut with the user's own requests and schemas.
- **Function masking** (as in the Hammer paper, ICLR 2025) replaces function and parameter names by neutral
  ones (``func_1``, ``param_1``, ...) in an example's tools and calls, so the model has to read the
  descriptions to choose and fill a function instead of matching names it has seen.

Both are pure functions of the examples and a seed (a resumed job rebuilds exactly the same data), and
torch-free. Every example they return passes :func:`citi_engine.data.validate.validate_jsonl`.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Sequence
from typing import Any

from citi_engine.data.schemas import function_of, tool_names

_NO_TOOL_FITS = (
    "None of the functions available to me ({names}) can do this, so I can't help with this request using them.",
    "I can't do that with the tools I have: {names} don't fit this request.",
    "No available function fits this request: I only have {names}.",
    "The tools I can use here ({names}) don't cover this request, so I won't call any of them.",
)


def _first_call(messages: list[dict]) -> int | None:
    for i, msg in enumerate(messages):
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            return i
    return None


def _called_names(message: dict) -> set[str]:
    return {function_of(call).get("name") for call in message.get("tool_calls") or []}


def _other_tools(examples: Sequence[dict], me: int, avoid: set[str], rng: random.Random) -> list[dict]:
    """One to three tools of another example, none named like a called function (empty when none exists)."""
    others = [i for i in range(len(examples)) if i != me and examples[i].get("tools")]
    rng.shuffle(others)
    for i in others[:20]:
        tools = [t for t in examples[i]["tools"] if function_of(t).get("name") not in avoid]
        if tools:
            return copy.deepcopy(rng.sample(tools, min(len(tools), rng.randint(1, 3))))
    return []


def build_negatives(examples: Sequence[dict], ratio: float, *, seed: int, near: float = 0.0) -> list[dict]:
    """About ``ratio * len(examples)`` irrelevance examples from the tool examples that call a function.

    Each keeps the request of one example (its messages before the first call), offers tools none of which is a
    function that call used, and answers in plain text naming the tools it has. Half the time (and always when
    the example's own list holds nothing else) the tools come from another example. With ``near`` (a share of
    the negatives), the tools come from the other example, of up to 200 drawn, whose tools share the most words
    with the request: near misses, a function close to what is asked that does not do it. Examples are drawn
    without repetition while there are enough, then again.
    """
    if ratio <= 0:
        return []
    rng = random.Random(seed * 7919 + 17)
    callers = [i for i, e in enumerate(examples) if _first_call(e.get("messages") or []) is not None]
    if not callers:
        return []
    wanted = round(ratio * len(examples))
    order: list[int] = []
    while len(order) < wanted:
        batch = list(callers)
        rng.shuffle(batch)
        order.extend(batch)
    out = []
    for i in order[:wanted]:
        example = examples[i]
        messages = example["messages"]
        first = _first_call(messages)
        called = _called_names(messages[first])
        own = [t for t in example.get("tools") or [] if function_of(t).get("name") not in called]
        if near > 0 and rng.random() < near:
            tools = _near_tools(examples, i, called, _words(messages[:first]), rng)
        else:
            tools = copy.deepcopy(own) if own and rng.random() < 0.5 else _other_tools(examples, i, called, rng)
        if not tools:
            tools = copy.deepcopy(own)
        if not tools:
            continue  # no tool anywhere that the request does not need
        names = ", ".join(tool_names(tools))
        answer = rng.choice(_NO_TOOL_FITS).format(names=names)
        prefix = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:first]]
        # Earlier assistant turns are context, not what this example teaches.
        prefix = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prefix]
        out.append({"messages": [*prefix, {"role": "assistant", "content": answer}], "tools": tools})
    return out


def _words(value: Any) -> set[str]:
    """The lower-case words of four letters or more in any text inside ``value`` (names split at ``_`` and ``.``)."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return set(re.findall(r"[a-z]{4,}", text.lower().replace("_", " ").replace(".", " ")))


def _near_tools(examples: Sequence[dict], me: int, avoid: set[str], request: set[str],
                rng: random.Random) -> list[dict]:
    """The tools (those not named like a called function) of the other example, of up to 200 drawn, whose names
    and descriptions share the most words with ``request``; ties go to the first drawn."""
    others = [i for i in range(len(examples)) if i != me and examples[i].get("tools")]
    rng.shuffle(others)
    best: list[dict] = []
    best_score = -1
    for i in others[:200]:
        tools = [t for t in examples[i]["tools"] if function_of(t).get("name") not in avoid]
        score = len(request & _words([(function_of(t).get("name"), function_of(t).get("description")) for t in tools]))
        if tools and score > best_score:
            best, best_score = tools, score
    return copy.deepcopy(best)


def mask_functions(example: dict, rng: random.Random) -> dict:
    """``example`` with its function names turned into ``func_N`` and each function's top-level parameter names
    into ``param_N`` (numbers in a random order), in the tools, the calls and the tool results alike.

    Descriptions stay as they are: they are what the model must read. An example whose call arguments name a
    parameter its schema does not define is returned unchanged (masking would hide the error).
    """
    tools = example.get("tools") or []
    names = [function_of(t).get("name") for t in tools]
    numbers = list(range(1, len(names) + 1))
    rng.shuffle(numbers)
    fn_map = {name: f"func_{n}" for name, n in zip(names, numbers, strict=True)}
    param_maps: dict[str, dict[str, str]] = {}
    new_tools = []
    for tool in tools:
        fn = copy.deepcopy(function_of(tool))
        params = fn.get("parameters") or {}
        props = params.get("properties") or {}
        order = list(range(1, len(props) + 1))
        rng.shuffle(order)
        pmap = {p: f"param_{n}" for p, n in zip(props, order, strict=True)}
        param_maps[fn.get("name")] = pmap
        if props:
            params["properties"] = {pmap[p]: v for p, v in props.items()}
            if isinstance(params.get("required"), list):
                params["required"] = [pmap.get(p, p) for p in params["required"]]
            fn["parameters"] = params
        fn["name"] = fn_map[fn.get("name")]
        new_tools.append({"type": "function", "function": fn})
    messages = []
    for msg in example["messages"]:
        msg = copy.deepcopy(msg)
        for call in msg.get("tool_calls") or []:
            fn = call.get("function", call)
            old = fn.get("name")
            if old not in fn_map:
                return example
            args = fn.get("arguments", {})
            decoded = json.loads(args) if isinstance(args, str) else dict(args)
            pmap = param_maps[old]
            if any(k not in pmap for k in decoded):
                return example
            fn["name"] = fn_map[old]
            fn["arguments"] = json.dumps({pmap[k]: v for k, v in decoded.items()}, ensure_ascii=False)
        if msg.get("role") == "tool" and msg.get("name") in fn_map:
            msg["name"] = fn_map[msg["name"]]
        messages.append(msg)
    out: dict[str, Any] = {k: v for k, v in example.items() if k not in ("messages", "tools")}
    out.update(messages=messages, tools=new_tools)
    return out


def mask_some(examples: Sequence[dict], fraction: float, *, seed: int) -> list[dict]:
    """The examples with ``fraction`` of the calling ones masked (:func:`mask_functions`), the rest unchanged."""
    if fraction <= 0:
        return list(examples)
    rng = random.Random(seed * 104729 + 3)
    callers = [i for i, e in enumerate(examples) if _first_call(e.get("messages") or []) is not None]
    chosen = set(rng.sample(callers, round(fraction * len(callers))))
    return [mask_functions(e, rng) if i in chosen else e for i, e in enumerate(examples)]


def unrelated_tool_lists(examples: Sequence[dict], count: int, *, seed: int) -> list[list[dict]]:
    """``count`` tool lists of one to three tools, each taken from one of ``examples`` (the job's tool data), for
    general prompts asked with tools that do not concern them. Empty when no example has tools."""
    pool = [e["tools"] for e in examples if e.get("tools")]
    if not pool:
        return []
    rng = random.Random(seed * 15485863 + 11)
    out = []
    for _ in range(count):
        tools = rng.choice(pool)
        out.append(copy.deepcopy(rng.sample(tools, min(len(tools), rng.randint(1, 3)))))
    return out
