"""Constrained decoding: grammars that the generated text must follow, applied as a token mask per step.

What the serving runtime (:mod:`citi_engine.serving`) constrains, and with which grammar:

- a forced tool call (``tool_choice`` ``required`` or a named function): :func:`tool_call_grammar`, one or
  more ``<tool_call>{"name": "<one of the tools>", "arguments": <JSON valid against that tool's
  parameters>}</tool_call>`` blocks in our chat format (:mod:`citi_engine.data.chat_format`), and nothing else;
- ``response_format`` ``json_object`` / ``json_schema``: :func:`json_grammar`, a JSON object / a JSON value
  valid against the schema (with tools under ``auto``, :func:`json_or_calls_grammar`: that, or tool calls);
- evaluation with constrained arguments (``citi eval --constrained``): :func:`text_or_calls_grammar`, free
  text or calls whose names and arguments are enforced.

Every grammar is written in llguidance's Lark dialect, in which ``%json {schema}`` is a rule that matches
exactly the JSON valid against ``schema``. JSON inside a call is spelt the way training spelt it
(``json.dumps`` defaults: ``", "`` between items, ``": "`` after keys, no other whitespace), so the model
continues in the format it learnt. :func:`compile_grammar` (or :func:`reply_grammar`, from a request's
tools and formats) compiles a grammar for a tokenizer, once per request; :class:`Matcher` follows one reply, token by token: :meth:`Matcher.fill` writes the bitmask of
the tokens allowed next, :func:`apply_bitmask` sets every other logit to ``-inf``, :meth:`Matcher.accept`
moves on by the chosen token. A forced prefix (the start of a call the runtime feeds itself) is consumed
by the matcher like generated tokens, so the grammar covers the whole reply.

**Why llguidance.** ``bench/constrained.py`` measured the three maintained libraries inside our own decode
loop (:func:`citi_engine.serving.generate`, the same bitmask application for all) on a tool-argument
schema, SmolLM2-135M-Instruct in fp32 with one torch thread, on the 2-core CPU dev machine (results and
method: ``bench/results/constrained.md``):

====================  ==============  ===============  ===================  ==========================
library               compile schema  mask per token   mask share of step   overhead per token, paired
                      (+ matcher)     (batch 1)        (batch 1 / 4)        rounds (batch 1 / 4)
====================  ==============  ===============  ===================  ==========================
llguidance 1.9.1      1.1 ms          0.29 ms          0.5 % / 0.8 %        +4.7 % / +2.3 %
xgrammar 0.2.9        6.7 ms          0.12 ms          0.1 % / 0.1 %        +2.5 % / -6.8 %
outlines-core 0.2.14  1692 ms         0.09 ms          0.1 % / 0.1 %        -0.9 % / +13.8 %
====================  ==============  ===============  ===================  ==========================

Per token all three are far under the 10 % target: a SmolLM2 decode step is 60 ms or more on this CPU and
the mask costs well under a millisecond (the paired overheads swing several percent either way because
other jobs share the CPU; the mask's share of a step is the steadier figure). What decides is the rest.
Every request brings its own tools, so a grammar is compiled per request: llguidance does it in about a
millisecond (a whole ``tool_choice: required`` grammar for two tools, names and both argument schemas, in
1.4 ms); outlines-core builds an automaton over the whole vocabulary (1.7 s per new schema) and its regex
drops integer ``minimum``/``maximum`` (the tiny model's replies came out invalid in the same run). llguidance's Lark grammars embed JSON schemas (``%json``) and regex
negation, which "a call whose name is one of the tools and whose arguments fit that tool" and "free text
with no call in it" need. And it installs as one abi3 wheel with no dependencies, where ``pip install
xgrammar`` on Linux x86-64 requires ``triton`` (and ``apache-tvm-ffi``), which CPU-only machines must
not pull.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from citi_engine.errors import CitiError

log = logging.getLogger("citi.constrained")

# How JSON is spelt inside a call and in JSON replies: json.dumps's defaults, as the training data has it.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(CitiError):
    """A grammar (usually a JSON schema inside one) that the grammar library cannot compile.

    ``param`` names the part of the request that holds the schema, when known.
    """

    code = "invalid_grammar"


# ------------------------------------------------------------------------------------------ grammars


def _lark_string(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: dict[str, Any] | None) -> str:
    """The ``%json`` rule of ``schema`` (any JSON object when None), spelt with :data:`JSON_STYLE`."""
    schema = dict(schema) if schema else {"type": "object"}
    schema["x-guidance"] = {**JSON_STYLE, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _call_rules(tools: Sequence[dict[str, Any]], parallel: bool) -> list[str]:
    """Lark rules ``calls`` (one call, or several one per line when ``parallel``) over ``tools``."""
    from citi_engine.data.chat_format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

    if not tools:
        raise ValueError("a tool-call grammar needs at least one tool")
    rules, names = [], []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool)
        opening = '{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": '
        rules.append(f"fn_{i}: {_lark_string(opening)} args_{i} \"}}\"")
        rules.append(f"args_{i}: {_json_rule(fn.get('parameters'))}")
        names.append(f"fn_{i}")
    rules.append(f"call: {_lark_string(TOOL_CALL_OPEN)} ({' | '.join(names)}) {_lark_string(TOOL_CALL_CLOSE)}")
    rules.append('calls: call ("\\n" call)*' if parallel else "calls: call")
    return rules


def tool_call_grammar(tools: Sequence[dict[str, Any]], *, parallel: bool = True) -> str:
    """The grammar of a reply that is only tool calls, each to one of ``tools`` with valid arguments.

    ``tools`` are OpenAI tool definitions (``{"type": "function", "function": {...}}``) or their ``function``
    parts; a function without ``parameters`` takes any JSON object. ``parallel=False`` allows one call.
    """
    return "\n".join(["start: calls", *_call_rules(tools, parallel)])


def text_or_calls_grammar(tools: Sequence[dict[str, Any]], *, parallel: bool = True) -> str:
    """Plain text with no ``<tool_call>`` in it, or tool calls as :func:`tool_call_grammar` allows them: ``auto``
    with every call's name and arguments enforced (``citi eval --constrained``). Text before a call is not
    allowed (the lexer would have to guess where the text ends); our training data never puts any there."""
    from citi_engine.data.chat_format import TOOL_CALL_OPEN

    no_call = "/(?s:.*)/ & ~/(?s:.*" + TOOL_CALL_OPEN + ".*)/"
    return "\n".join(["start: TEXT | calls", f"TEXT: {no_call}", *_call_rules(tools, parallel)])


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """The grammar of a reply that is one JSON value valid against ``schema`` (any JSON object when None)."""
    return f"start: {_json_rule(schema)}"


def json_or_calls_grammar(schema: dict[str, Any] | None, tools: Sequence[dict[str, Any]], *,
                          parallel: bool = True) -> str:
    """A JSON reply (as :func:`json_grammar`) or tool calls (as :func:`tool_call_grammar`): ``response_format``
    under ``tool_choice: auto``."""
    return "\n".join(["start: answer | calls", f"answer: {_json_rule(schema)}", *_call_rules(tools, parallel)])


# ------------------------------------------------------------------------------------------ tokenizers

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any):
    """llguidance's view of a Hugging Face fast tokenizer (about 0.3 s to build for a 49k vocabulary; cached).

    Its end tokens are the ones our decode loops stop at, so a finished grammar lets any of them through.
    """
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(tokenizer)
        if cached is not None:
            return cached
        import llguidance

        from citi_engine.generate import stop_token_ids

        ends = sorted(stop_token_ids(None, tokenizer))
        backend = copy.copy(tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        spec = byte_level_decoder(json.loads(backend.to_str()))
        ll = llguidance.LLTokenizer(json.dumps(spec), n_vocab=len(tokenizer), eos_token=ends or None)
        _TOKENIZERS[tokenizer] = ll
        return ll


def byte_level_decoder(spec: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer description whose decoder is plain ``ByteLevel`` where its pre-tokenizer is byte-level.

    llguidance reads a token's bytes through the description's decoder. Some transformers releases describe a
    byte-level BPE vocabulary converted from GGUF with a decoder chain (``ByteFallback``, ``Fuse``, ``Replace``,
    ``ByteLevel``: 5.17 does, 5.25 does not), which llguidance does not recognise, so it read the token
    ``Ġ"`` as the UTF-8 bytes of its two characters instead of a space and a quote, and refused every call
    the model started with a space (H100 quality benchmark: constrained parse rate 0). The
    pre-tokenizer says what the vocabulary is; the decoder is made to say the same.
    """
    if not _has_byte_level(spec.get("pre_tokenizer")) or (spec.get("decoder") or {}).get("type") == "ByteLevel":
        return spec
    out = dict(spec)
    out["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return out


def _has_byte_level(part: dict[str, Any] | None) -> bool:
    if not part:
        return False
    if part.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in part.get("pretokenizers") or ())


# ------------------------------------------------------------------------------------------ compiling


class Grammar:
    """A grammar compiled for one tokenizer; :meth:`matcher` starts following a reply with it.

    Compiling builds the first matcher (that is where llguidance compiles), so a grammar that does not
    compile raises :class:`GrammarError` here, and the request's own matcher costs nothing more.
    """

    def __init__(self, lark: str, tokenizer: Any):
        from llguidance import LLMatcher

        self.lark = lark
        self.tokenizer = tokenizer
        self._ll = _ll_tokenizer(tokenizer)
        self.vocab_size = self._ll.vocab_size
        first = LLMatcher(self._ll, lark, log_level=0)
        if first.is_error():
            raise GrammarError(f"the grammar does not compile: {_first_line(first.get_error())}")
        self._first: Any = first

    def matcher(self) -> Matcher:
        """A fresh :class:`Matcher` at the start of the reply."""
        from llguidance import LLMatcher

        inner, self._first = self._first, None
        if inner is None:
            inner = LLMatcher(self._ll, self.lark, log_level=0)
        if inner.is_error():  # it compiled once: this is our bug, not the caller's
            raise RuntimeError(f"a compiled grammar failed to start: {inner.get_error()}")
        return Matcher(inner)


def check_grammar(lark: str, tokenizer: Any) -> str | None:
    """None when ``lark`` compiles for ``tokenizer``, else the library's message."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(lark, _ll_tokenizer(tokenizer))
    return _first_line(messages[0]) if is_error else None


def _first_line(message: str) -> str:
    """The library's message on one line, without the listing of our grammar it may append and without the
    grammar position (both ours, not the caller's)."""
    kept = []
    for line in message.strip().splitlines():
        if re.match(r"^\s*\d+ \| ", line):  # the grammar listing starts: the rest is ours
            break
        if line.strip() and set(line.strip()) != {"^"}:
            kept.append(line.strip())
    return re.sub(r"^at \d+\(\d+\):\s*", "", " ".join(kept)) or "unknown error"


def check_schema(schema: dict[str, Any] | None, tokenizer: Any) -> str | None:
    """None when the JSON ``schema`` compiles into a grammar, else why not (to tell the caller)."""
    try:
        return check_grammar(json_grammar(schema), tokenizer)
    except (TypeError, ValueError) as exc:
        return str(exc)


def compile_grammar(lark: str, tokenizer: Any) -> Grammar:
    """``lark`` compiled for ``tokenizer``; raises :class:`GrammarError` with the library's message."""
    return Grammar(lark, tokenizer)


def reply_grammar(tokenizer: Any, *, tools: Sequence[dict[str, Any]] = (), tool_choice: str = "none",
                  function: str | None = None, response_format: str | None = None,
                  schema: dict[str, Any] | None = None, parallel: bool = True) -> Grammar | None:
    """The grammar of a chat reply, compiled for ``tokenizer``; None when the reply is free.

    ``tool_choice`` is ``none``, ``auto``, ``required`` or ``named`` (then ``function`` is the name);
    ``response_format`` is ``text``, ``json_object`` or ``json_schema`` (then ``schema`` is the schema). A forced
    call (``required``: any of ``tools``; ``named``: that one) wins over ``response_format``, which applies to
    text; under ``auto`` a JSON ``response_format`` allows the JSON reply or calls. Raises :class:`GrammarError`
    whose ``param`` names the schema that does not compile (``tools[i].function.parameters`` or
    ``response_format.json_schema.schema``, as in the request).
    """
    json_reply = response_format in ("json_object", "json_schema")
    offered = list(tools) if tool_choice in ("auto", "required") else [
        t for t in tools if t.get("function", t).get("name") == function]
    if tool_choice in ("required", "named"):
        lark = tool_call_grammar(offered, parallel=parallel)
    elif json_reply and tool_choice == "auto" and offered:
        lark = json_or_calls_grammar(schema, offered, parallel=parallel)
    elif json_reply:
        lark = json_grammar(schema)
    else:
        return None
    try:
        return Grammar(lark, tokenizer)
    except GrammarError as exc:
        error = exc.message
    # Say which schema of the request it is.
    if json_reply and tool_choice not in ("required", "named"):
        why = check_schema(schema, tokenizer)
        if why:
            raise GrammarError(f"response_format.json_schema.schema cannot be enforced: {why}; leave out or "
                               "rewrite the part named (or ask for response_format 'json_object')",
                               code="invalid_response_format", param="response_format.json_schema.schema")
    if tool_choice != "none":
        for i, tool in enumerate(tools):
            fn = tool.get("function", tool)
            if tool in offered and (why := check_schema(fn.get("parameters"), tokenizer)):
                raise GrammarError(f"the parameters of function '{fn.get('name')}' cannot be enforced: {why}; "
                                   "leave out or rewrite the part named",
                                   code="invalid_tool_schema", param=f"tools[{i}].function.parameters")
    raise GrammarError(f"the reply's grammar does not compile: {error}")


# ------------------------------------------------------------------------------------------ decoding


class Matcher:
    """One reply's position in its grammar."""

    def __init__(self, inner: Any):
        self._inner = inner

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """Write into row ``index`` of ``bitmask`` (int32, CPU, one bit per token) the tokens allowed next."""
        # Straight into the row's memory (llguidance.torch would do the same, but importing it sets up torch.compile).
        row = bitmask[index]
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not row.is_contiguous():
            raise ValueError("the bitmask must be a contiguous int32 tensor on the CPU (see allocate_bitmask)")
        self._inner.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token: int) -> bool:
        """Move on by ``token``; False when the grammar does not allow it (the matcher is then in error)."""
        return self._inner.consume_token(int(token))

    def accept_all(self, tokens: Sequence[int]) -> bool:
        """Move on by each of ``tokens`` (a forced prefix)."""
        return self._inner.consume_tokens([int(t) for t in tokens])

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (not even text that would extend it)."""
        return self._inner.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is a complete reply (an end token may come now)."""
        return self._inner.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the matcher stopped following the reply, or None."""
        return self._inner.get_error() if self._inner.is_error() else None


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask for ``rows`` rows of ``vocab_size`` tokens, every token allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to ``-inf`` each logit of ``logits`` (B, V) whose bit in ``bitmask`` (B, ceil(V'/32)) is 0.

    Logits of ids past the bitmask's vocabulary (padding rows of a model's output layer) are masked too.
    """
    bitmask = bitmask.to(logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> _BITS.to(logits.device)) & 1).bool().view(bitmask.shape[0], -1)
    width = min(allowed.shape[1], logits.shape[1])
    logits[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
    if logits.shape[1] > width:
        logits[:, width:] = float("-inf")
