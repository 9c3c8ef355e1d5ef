"""Turning conversations into model text and back: one rendering for training, evaluation, replay and serving.

Rendering always goes through the tokenizer's chat template. When the template knows about tools (its source
mentions ``tools``), the tools and the OpenAI-shaped tool calls are handed to it. When it does not (SmolLM2's
template), we use our built-in format:

- the system turn holds the system text (if any) followed by a block that lists the tools as JSON and says how
  to call them;
- an assistant call is written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per
  call, several in a row for parallel calls;
- a tool result is a ``tool`` turn, or, for a template that rejects that role, a user turn that says clearly
  that it holds a tool result.

:func:`parse_tool_calls` reads generated text back into OpenAI tool calls. :func:`encode_example` tokenises a
training example with labels on the assistant tokens only; it finds those tokens by rendering growing
prefixes of the conversation and diffing them, so it works with any prefix-stable chat template.

This module imports neither torch nor transformers; the functions that render take a tokenizer object.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from citi_engine.data.schemas import function_of, normalize_tool, task_type_of

IGNORE_INDEX = -100

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_OPEN = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*")
_CLOSE = re.compile(r"\s*" + re.escape(TOOL_CALL_CLOSE))
_JSON = json.JSONDecoder()

# For tokenizers that ship no chat template at all (base models): plain ChatML, as SmolLM2 uses.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CALL_INSTRUCTION = (
    "To call a function, reply with "
    + TOOL_CALL_OPEN
    + '{"name": "<function name>", "arguments": {<arguments as a JSON object>}}'
    + TOOL_CALL_CLOSE
    + ". Use one block per call; for several calls, write the blocks one after another. "
    "If no function fits the request, answer in plain text."
)


# ----------------------------------------------------------------------------------------------------------------
# Tool calls as text


def _arguments_object(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        value = json.loads(arguments) if arguments.strip() else {}
        if isinstance(value, dict):
            return value
    raise ValueError(f"tool call arguments must be a JSON object or a string encoding one, got {arguments!r}")


def format_tool_calls(tool_calls: list[dict[str, Any]]) -> str:
    """Write OpenAI-shaped tool calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

    ``arguments`` may be the OpenAI JSON string or an already decoded object. Blocks are joined by newlines.
    """
    blocks = []
    for call in tool_calls:
        fn = call.get("function", call)
        payload = {"name": fn["name"], "arguments": _arguments_object(fn.get("arguments", {}))}
        blocks.append(TOOL_CALL_OPEN + json.dumps(payload, ensure_ascii=False) + TOOL_CALL_CLOSE)
    return "\n".join(blocks)


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id, ``call_<hex>``."""
    return "call_" + secrets.token_hex(12)


def _read_block(text: str, start: int) -> tuple[dict[str, Any] | None, int]:
    """The call whose JSON starts at ``start`` (just after an opening tag) and where its block ends.

    Strict on purpose: the JSON must be exactly one object ``{"name": str, "arguments": {...}}`` followed by
    the closing tag; anything else is not a call. Reading the JSON itself (rather than searching for the
    closing tag) keeps a ``</tool_call>`` inside an argument string from cutting the block short.
    """
    try:
        payload, end = _JSON.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None, start
    close = _CLOSE.match(text, end)
    if close is None or not isinstance(payload, dict):
        return None, start
    name, arguments = payload.get("name"), payload.get("arguments")
    if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
        return None, start
    call = {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name.strip(), "arguments": json.dumps(arguments, ensure_ascii=False)},
    }
    return call, close.end()


def opens_with_call(text: str) -> bool:
    """Whether a reply opens with a ``<tool_call>`` block (after any whitespace), as every trained call does.
    Served with a call threshold, a reply that does not is text: a block further on is not a call."""
    return text.lstrip().startswith(TOOL_CALL_OPEN)


def parse_reply(text: str, *, opening_only: bool = False) -> tuple[str | None, list[dict[str, Any]]]:
    """:func:`parse_tool_calls`, except that with ``opening_only`` (served with a call threshold) a reply that
    does not open with a call is all content and has no calls."""
    if opening_only and not opens_with_call(text):
        return text, []
    return parse_tool_calls(text)


def call_threshold_bias(tokenizer, threshold: float) -> dict[int, float]:
    """The ``opening_bias`` (:class:`citi_engine.serving.GenerationRequest`) that serves a call threshold: minus
    the threshold on every token that opens a call (:func:`call_open_tokens`); none at 0."""
    return {token: -threshold for token in call_open_tokens(tokenizer)} if threshold > 0 else {}


@functools.lru_cache(maxsize=16)
def call_open_tokens(tokenizer) -> tuple[int, ...]:
    """The tokens a reply can open a call with: those whose text, after any leading whitespace, starts
    ``<tool_call>`` (``<`` and `` <`` for SmolLM2's tokenizer; the first token of the tag comes first)."""
    first = tokenizer(TOOL_CALL_OPEN, add_special_tokens=False)["input_ids"][0]
    others = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token]).lstrip()
        if token != first and text and (TOOL_CALL_OPEN.startswith(text) or text.startswith(TOOL_CALL_OPEN)):
            others.append(token)
    return (first, *others)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into ``(content, tool_calls)`` with OpenAI-shaped calls (ids ``call_<hex>``).

    Every well-formed ``<tool_call>`` block becomes a call, in order; whitespace around and inside the
    blocks is tolerated. A block whose JSON is malformed (or lacks ``name``/``arguments``, or is not closed)
    is not guessed at: it stays in the content. The content is the remaining text, stripped; ``None`` when
    calls were made and nothing else was said.
    """
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = search = 0
    while (opening := _OPEN.search(text, search)) is not None:
        call, end = _read_block(text, opening.end())
        if call is None:
            search = opening.end()
            continue
        kept.append(text[pos : opening.start()])
        calls.append(call)
        pos = search = end
    kept.append(text[pos:])
    content = "".join(kept).strip()
    if calls and not content:
        return None, calls
    return content, calls


def tools_system_block(tools: list[dict[str, Any]]) -> str:
    """The text our built-in format adds to the system turn: each tool as one JSON line, then how to call."""
    lines = ["You can call the following functions, each described in JSON Schema:"]
    for tool in tools:
        fn = function_of(tool)
        doc = {"name": fn.get("name"), "description": fn.get("description", ""), "parameters": fn.get("parameters", {})}
        lines.append(json.dumps(doc, ensure_ascii=False))
    lines.append(_CALL_INSTRUCTION)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# What a chat template can do


@dataclass(frozen=True)
class TemplateCaps:
    """What a chat template supports, found by reading and probing it once."""

    tools: bool  # the source mentions `tools`: hand tools and calls to the template itself
    tool_role: bool  # renders a `tool` message (else results become clearly marked user turns)
    system_role: bool  # renders a `system` message (else the tool block goes into the first user turn)


_CAPS_CACHE: dict[str, TemplateCaps] = {}
_PROBE = "c1t1-probe-7f3a"


def _template_source(tokenizer: Any, tools: list[dict[str, Any]] | None) -> str:
    try:
        return tokenizer.get_chat_template(tools=tools or None)
    except (ValueError, AttributeError):
        return CHATML_TEMPLATE


def _apply(tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, generation_prompt: bool) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": generation_prompt, "chat_template": template}
    if tools:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, **kwargs)


def _renders(tokenizer: Any, template: str, messages: list[dict[str, Any]]) -> bool:
    try:
        return _PROBE in _apply(tokenizer, template, messages, None, False)
    except Exception:  # a template signals an unsupported role by raising whatever its author chose
        return False


def template_caps(tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> TemplateCaps:
    """Read (and cache per template source) what the tokenizer's chat template supports."""
    source = _template_source(tokenizer, tools)
    caps = _CAPS_CACHE.get(source)
    if caps is None:
        caps = TemplateCaps(
            tools=re.search(r"\btools\b", source) is not None,
            tool_role=_renders(
                tokenizer,
                source,
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                 {"role": "tool", "content": _PROBE}],
            ),
            system_role=_renders(
                tokenizer, source, [{"role": "system", "content": _PROBE}, {"role": "user", "content": "q"}]
            ),
        )
        _CAPS_CACHE[source] = caps
    return caps


def supports_tools(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template renders tools itself (its source mentions ``tools``)."""
    return template_caps(tokenizer, tools=[{"type": "function", "function": {"name": "probe"}}]).tools


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Templates with tool support (the Hugging Face convention) expect decoded argument objects.
    out = []
    for i, msg in enumerate(messages):
        m = {k: v for k, v in msg.items() if k != "weight"}
        if m.get("content") is None:
            m["content"] = ""
        if msg.get("tool_calls"):
            m["tool_calls"] = [
                {
                    # a missing id must render the same in every prefix, so it is derived, not random
                    "id": call.get("id") or f"call_{i:04x}{j:04x}",
                    "type": "function",
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": _arguments_object(call["function"].get("arguments", {})),
                    },
                }
                for j, call in enumerate(msg["tool_calls"])
            ]
        out.append(m)
    return out


def _builtin_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, caps: TemplateCaps
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for msg in messages:
        role, content = msg["role"], msg.get("content") or ""
        if role == "assistant" and msg.get("tool_calls"):
            for call in msg["tool_calls"]:
                if call.get("id"):
                    call_names[call["id"]] = call["function"]["name"]
            calls = format_tool_calls(msg["tool_calls"])
            content = f"{content}\n{calls}" if content.strip() else calls
        elif role == "tool" and not caps.tool_role:
            name = msg.get("name") or call_names.get(msg.get("tool_call_id") or "", "")
            label = f"Result of the tool call {name}:" if name else "Result of the tool call:"
            role, content = "user", f"{label}\n{content}"
        out.append({"role": role, "content": content})

    if not caps.system_role and out and out[0]["role"] == "system":
        system = out.pop(0)["content"]
        if out and out[0]["role"] == "user":
            out[0] = {"role": "user", "content": f"{system}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "user", "content": system})
    if tools:
        block = tools_system_block(tools)
        if out and out[0]["role"] == "system":
            system = out[0]["content"].rstrip()
            out[0] = {"role": "system", "content": f"{system}\n\n{block}" if system else block}
        elif caps.system_role:
            out.insert(0, {"role": "system", "content": block})
        elif out and out[0]["role"] == "user":
            out[0] = {"role": "user", "content": f"{block}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "user", "content": block})
    return out


def render_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """Render a conversation (training format) to text with the tokenizer's chat template.

    Tools go to the template where it supports them, else into our built-in format (see the module doc).
    """
    tools = [normalize_tool(t) for t in tools] if tools else None
    source = _template_source(tokenizer, tools)
    caps = template_caps(tokenizer, tools)
    if caps.tools:
        return _apply(tokenizer, source, _native_messages(messages), tools, add_generation_prompt)
    return _apply(tokenizer, source, _builtin_messages(messages, tools, caps), None, add_generation_prompt)


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation followed by the generation prompt: the text a model continues to answer."""
    return render_conversation(tokenizer, messages, tools, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------------------------
# Encoding for training


def trainable_spans(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trainable assistant turns.

    A span runs from the end of the generation prompt before an assistant turn to the end of that turn's
    rendering (its text, tool-call blocks and end-of-turn token; trailing whitespace excluded). Turns with
    ``weight: 0`` give no span. Raises ``ValueError`` when the template is not prefix-stable (it rewrites
    earlier turns as the conversation grows), since the spans would then be wrong.
    """
    full = render_conversation(tokenizer, messages, tools)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant" or msg.get("weight", 1) == 0:
            continue
        before = render_conversation(tokenizer, messages[:i], tools, add_generation_prompt=True)
        through = render_conversation(tokenizer, messages[: i + 1], tools)
        if not through.startswith(before) or not full.startswith(through):
            raise ValueError(
                f"the chat template renders assistant turn {i} differently depending on what follows it, so its "
                "tokens cannot be found by prefix diffing; use a model whose chat template keeps earlier turns "
                "unchanged (most do), or give a prefix-stable template to the tokenizer"
            )
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def _tokenize_with_labels(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return _tokenize_by_segments(tokenizer, text, spans)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    # A token is trainable when it starts inside a span: tokens are in text order, so one pass suffices.
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > start and start >= spans[k][0]:
            labels[t] = ids[t]
    return ids, labels


def _tokenize_by_segments(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    # Slow tokenizers give no offsets: tokenise the pieces between span borders one by one.
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, trainable in ((text[pos:start], False), (text[start:end], True)):
            if not piece:
                continue
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids.extend(piece_ids)
            labels.extend(piece_ids if trainable else [IGNORE_INDEX] * len(piece_ids))
        pos = end
    return ids, labels


def encode_example(tokenizer: Any, example: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Tokenise one training example with loss on its trainable assistant tokens only.

    Returns ``{"input_ids", "labels", "task_type", "truncated", "num_tokens"}``: ``labels`` is -100 except on
    the assistant turns' text, tool-call blocks and end-of-turn tokens (``weight: 0`` turns stay masked);
    ``task_type`` is 1 for a tool example, 0 for a general one. An example longer than ``max_length`` is cut
    to ``max_length`` tokens with ``truncated`` set and its full length in ``num_tokens``; the validator's
    :func:`citi_engine.data.validate.check_lengths` reports such examples to the user beforehand.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    text, spans = trainable_spans(tokenizer, example["messages"], example.get("tools") or None)
    ids, labels = _tokenize_with_labels(tokenizer, text, spans)
    num_tokens = len(ids)
    truncated = num_tokens > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "task_type": int(task_type_of(example)),
        "truncated": truncated,
        "num_tokens": num_tokens,
    }
