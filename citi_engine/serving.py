"""The serving runtime: trained adapters as swappable modules on one shared base model, and batched
generation with per-request settings. The inference server (``worker/inference*.py``) decides which
models and adapters stay loaded and which requests share a batch; the compute is here.

1. **Adapters as modules.** :func:`read_adapter_modules` reads an adapter directory the way
   :func:`citi_engine.adapter.load_adapter` does (``citi_job.json`` via ``read_job``, the peft config
   and weights via peft's own readers) and builds, for each component it changes, a module to put in
   place of the base model's linear layer; the base's weights are never written to.

   * MOLoRA components stay unmerged (:class:`~citi_engine.molora.FrozenMoloraLinear`, the method's
     ``layer.py``): the router decides per token how much of the experts to add, so there is no single
     weight to merge. Training and serving compute the same ``molora_mix``.
   * UCO components were fully fine-tuned: the adapter keeps its own copy of just those layers.
   * peft LoRA adapters (the ``lora`` baseline) become :class:`FrozenLoraLinear`, also unmerged.

   Swapping these modules into the base (:func:`swap_modules`) is a few hundred attribute assignments,
   so one base model serves many adapters, one batch at a time.

2. **Batched generation.** :func:`generate` runs one batch of :class:`GenerationRequest` on one model:
   left-padded prefill in chunks (:func:`~citi_engine.generate.prefill`), then a decode loop with a KV
   cache, each request with its own sampling settings, stop strings, token budget, optional forced prefix
   and optional grammar, text deltas reported as they come. Finished rows leave the batch and its KV
   cache. It is built on :mod:`citi_engine.generate`'s pieces (padding, the prefill, the forward, the
   sampler, end-of-turn tokens), so at temperature 0 it gives the text
   :func:`~citi_engine.generate.generate_chat` gives.

3. **Constrained rows.** A request with a ``grammar`` (:mod:`citi_engine.constrained`: forced tool calls
   whose arguments fit the tool's schema, JSON replies) gets a matcher that consumes its forced prefix
   and then, at every step, masks the logits of its row to the tokens the grammar allows next, before
   greedy choice or sampling. Rows of one batch each have their own grammar or none; the masks of the
   constrained rows are computed into one bitmask and applied in one operation. A row ends when its
   grammar is complete (nothing may follow) or at an end token the grammar allowed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers.decoders import DecodeStream as _DecodeStream
from torch import nn

from citi_engine import GRAPH_MODES, resolve_decode
from citi_engine.adapter import read_job
from citi_engine.constrained import Grammar, allocate_bitmask, apply_bitmask
from citi_engine.generate import (
    forward_last_logits,
    pad_left,
    prefill,
    prefill_chunk_for,
    sample_tokens,
    stop_token_ids,
)
from citi_engine.molora import PEFT_TYPE_NAME, FrozenMoloraLinear
from citi_engine.molora import layer as molora_layer

log = logging.getLogger("citi.serving")

# ------------------------------------------------------------------------------------------ adapters


class FrozenLoraLinear(nn.Module):
    """A trained peft LoRA component on a shared, frozen ``nn.Linear``, unmerged: ``W0 x + (alpha/r) B A x``.

    ``B`` is stored transposed and pre-scaled so ``addmm`` adds it onto the base output in place.
    """

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        self.a = nn.Parameter(a.to(w.device, w.dtype), requires_grad=False)
        b_scaled = b.to(torch.promote_types(b.dtype, torch.float32)) * scaling  # scaled in fp32 or finer, then cast
        self.b_scaled_t = nn.Parameter(b_scaled.t().contiguous().to(w.device, w.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base.weight, self.base.bias)
        low = F.linear(x, self.a)
        return torch.addmm(out.view(-1, out.shape[-1]), low.view(-1, low.shape[-1]), self.b_scaled_t).view(out.shape)


def adapter_base_spec(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter was trained on, as recorded in its directory."""
    job = read_job(adapter_dir)
    spec = job.get("base_model") or (job.get("config") or {}).get("model")
    if spec:
        return spec
    config = Path(adapter_dir) / "adapter_config.json"
    if config.is_file():
        from peft import PeftConfig

        spec = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
        if spec:
            return spec
    raise ValueError(f"adapter directory {adapter_dir} does not say which base model it belongs to "
                     "(no citi_job.json 'model' and no adapter_config.json 'base_model_name_or_path')")


_ADAPTER_PARAMS = (".molora_router", ".molora_A", ".molora_B", ".lora_A.", ".lora_B.")


def _module_and_param(key: str) -> tuple[str, str]:
    """Split a saved peft key into (base module name, parameter name inside the adapter layer)."""
    key = key.removeprefix("base_model.model.")
    for marker in _ADAPTER_PARAMS:
        i = key.find(marker)
        if i >= 0:
            return key[:i], key[i + 1:]
    name, _, param = key.rpartition(".")
    return name, param


def _full_copy(base: nn.Linear, params: dict[str, torch.Tensor]) -> nn.Linear:
    """A UCO component: the adapter's own copy of the whole layer, in the base's dtype and device."""
    w = base.weight
    copy = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        copy.weight.copy_(params["weight"])
        if base.bias is not None:
            copy.bias.copy_(params.get("bias", base.bias))
    copy.requires_grad_(False)
    return copy


def _lora_scaling(config: Any, name: str, r: int) -> float:
    alpha = float(config.lora_alpha)
    for pattern, value in (config.alpha_pattern or {}).items():
        if name == pattern or name.endswith("." + pattern):
            alpha = float(value)
    return alpha / r**0.5 if config.use_rslora else alpha / r


def read_adapter_modules(adapter_dir: str | os.PathLike,
                         linears: dict[str, nn.Linear]) -> tuple[str, dict[str, nn.Module]] | None:
    """``(kind, modules)`` of a CITI (``citi``) or peft LoRA (``lora``) adapter, built over ``linears``.

    ``linears`` are the base model's own linear layers by module name; every returned module wraps (or,
    for UCO, copies) one of them. Returns None for an adapter this runtime does not split into modules
    (a full fine-tune, another peft method, DoRA or per-module ranks, a module that is not a linear layer
    of this base): load it as a model of its own with :func:`citi_engine.adapter.load_adapter`.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
        return None
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(str(adapter_dir))  # the method's own config class (MOLoRA is registered)
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type not in (PEFT_TYPE_NAME, "LORA"):
        return None
    lora = peft_type == "LORA"
    if lora and (config.use_dora or config.rank_pattern):
        return None  # variants FrozenLoraLinear does not compute
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_peft_weights(str(adapter_dir), device="cpu").items():
        name, param = _module_and_param(key)
        grouped.setdefault(name, {})[param] = tensor
    modules: dict[str, nn.Module] = {}
    for name, params in grouped.items():
        base = linears.get(name)
        if base is None:
            log.warning("adapter %s names module %s, which is not a linear layer of the base model", adapter_dir, name)
            return None
        if set(params) <= {"weight", "bias"}:
            modules[name] = _full_copy(base, params)
        elif lora and set(params) == {"lora_A.weight", "lora_B.weight"}:
            a, b = params["lora_A.weight"], params["lora_B.weight"]
            modules[name] = FrozenLoraLinear(base, a, b, _lora_scaling(config, name, a.shape[0]))
        elif not lora and set(params) == {"molora_router", "molora_A", "molora_B"}:
            modules[name] = FrozenMoloraLinear(base, params["molora_router"], params["molora_A"], params["molora_B"],
                                               config.num_experts, config.r, config.scaling, config.gate)
        else:
            log.warning("adapter %s: unexpected tensors %s for %s", adapter_dir, sorted(params), name)
            return None
    if not lora and molora_layer.SHARED_INPUT_GROUPS:
        molora_layer.link_shared_inputs(modules)
    return ("lora" if lora else "citi"), modules


def swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module of ``modules`` in place of the submodule of ``model`` with its name."""
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)


# ---------------------------------------------------------------------------------------- generation


@dataclass
class GenerationRequest:
    """One request's generation settings and, once run, its outcome.

    ``prefix_options`` are forced starts of the assistant's text, as token ids: with one, generation
    continues from it; with several, the one the model finds most likely (summed log-probability) is
    used. ``on_text`` receives text deltas from the generating thread (the forced prefix first); text
    that might be the start of a stop string is held back until it is clear. ``grammar``
    (:func:`citi_engine.constrained.compile_grammar`) constrains the whole reply, forced prefix included.
    ``opening_bias`` (token id -> number) is added to the logits while the reply holds nothing but whitespace,
    when no prefix is forced: the served adapter's call threshold (a bias of ``-t`` on the tokens that open
    ``<tool_call>``, :func:`citi_engine.evaluate.tool_eval.choose_call_threshold`) lives here.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    prefix_options: list[list[int]] = field(default_factory=list)
    ignore_eos: bool = False
    grammar: Grammar | None = None
    opening_bias: dict[int, float] = field(default_factory=dict)
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # outcome
    text: str = ""
    prefix_text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    time_to_first_token: float | None = None  # seconds from submitted_at
    finished_at: float | None = None  # time.perf_counter() when the last token came
    submitted_at: float = field(default_factory=time.perf_counter)


class _Row:
    """Decode state of one request inside a batch."""

    def __init__(self, req: GenerationRequest, prefix: list[int], tokenizer, device: torch.device):
        self.req = req
        self.prefix = prefix
        self.ids: list[int] = []
        self.emitted = 0  # characters of the generated text already sent through on_text
        # The reply's text grows a token at a time (tokenizers' DecodeStream) instead of decoding every id again at
        # every step, which cost each row O(length) host time a step and made 16 rows decode 16x as slowly as one.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = (_DecodeStream(skip_special_tokens=False)
                        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
                        else None)
        self._backend, self._vocab = backend, len(tokenizer)
        self._decoded = ""  # the text of every id the stream has turned into whole characters
        self._pending = False  # the stream holds bytes of a character not yet complete
        self.done = False
        self.ended_by_eos = False
        self.tokenizer = tokenizer
        self.matcher = req.grammar.matcher() if req.grammar is not None else None
        if self.matcher is not None and prefix and not self.matcher.accept_all(prefix):
            raise ValueError(f"the forced prefix does not follow the request's grammar: {self.matcher.error}")
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little"))

    def add(self, token: int) -> None:
        """Append a generated token to the reply."""
        self.ids.append(token)
        if self._stream is None or token >= self._vocab:  # an id the tokenizer lacks decodes to nothing
            return
        chunk = self._stream.step(self._backend, token)
        self._pending = chunk is None
        if chunk:
            self._decoded += chunk

    def text(self) -> str:
        """The reply so far, as ``tokenizer.decode`` gives it (a character still incomplete shows as U+FFFD)."""
        if self._stream is None or self._pending:
            return self.tokenizer.decode(self.ids, skip_special_tokens=False)
        return self._decoded


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still grow into a stop string (or finish a character)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):  # a multi-byte character split across tokens
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: Any, requests: list[GenerationRequest],
             prefill_chunk: int | None = None, decode: str = "dynamic") -> None:
    """Generate for every request of one batch on ``model`` (filling in their outcome fields).

    ``prefill_chunk``: prompt tokens per row that one prefill forward takes, as in
    :func:`citi_engine.generate.generate_ids` (None: chosen for the batch size, 0: whole prompts at once).
    ``decode``: ``dynamic`` (a growing KV cache; finished rows leave the batch), ``static`` (a static KV
    cache, :class:`citi_engine.static_decode.StaticDecoder`), ``cuda_graphs`` (static, each step replayed
    from a captured CUDA graph on a GPU; static elsewhere) or ``compiled_graphs`` (the same with the step
    compiled by ``torch.compile`` first), or ``auto`` (:func:`citi_engine.resolve_decode`: ``cuda_graphs`` on a GPU,
    else ``dynamic``). Greedy replies are the same in all of them up to the device's arithmetic.
    """
    device = next(model.parameters()).device
    decode = resolve_decode(decode, device.type)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = stop_token_ids(model, tokenizer)
    rows = []
    for req in requests:
        prefix = req.prefix_options[0] if len(req.prefix_options) == 1 else []
        if len(req.prefix_options) > 1:
            prefix = most_likely_prefix(model, req.prompt_ids, req.prefix_options, pad)
        rows.append(_Row(req, prefix, tokenizer, device))
    for row in rows:
        row.req.prefix_text = tokenizer.decode(row.prefix, skip_special_tokens=False) if row.prefix else ""
        if row.req.prefix_text and row.req.on_text:
            row.req.on_text(row.req.prefix_text)

    # Left padding: every row's next token lands in the last column; positions count real tokens only.
    input_ids, mask = pad_left([r.req.prompt_ids + r.prefix for r in rows], pad, device)
    chunk = prefill_chunk_for(len(rows)) if prefill_chunk is None else prefill_chunk
    if decode != "dynamic":
        _decode_static(model, rows, input_ids, mask, chunk, eos, pad, graphs=decode in GRAPH_MODES,
                       compiled=decode == "compiled_graphs")
        return
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, kv = prefill(model, input_ids, mask, positions, chunk)
    next_pos = mask.sum(-1, keepdim=True)
    live = list(range(len(rows)))  # batch row -> index into rows
    for _ in range(max(r.req.max_new_tokens for r in rows)):
        _bias_opening(logits, [rows[i] for i in live])
        _constrain(logits, [rows[i] for i in live])
        tokens = _next_tokens(logits, [rows[i] for i in live])
        now = time.perf_counter()
        keep = []
        for b, i in enumerate(live):
            _advance(rows[i], tokens[b], eos, now)
            if not rows[i].done:
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(live):  # drop finished rows from the batch and its KV cache
            idx = torch.tensor(keep, device=device)
            kv.batch_select_indices(idx)
            mask, next_pos = mask[idx], next_pos[idx]
            tokens = [tokens[b] for b in keep]
            live = [live[b] for b in keep]
        step = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(-1)
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        logits, kv = forward_last_logits(model, kv, input_ids=step, attention_mask=mask, position_ids=next_pos)
        next_pos = next_pos + 1
    for row in rows:  # rows cut by the shared loop bound (cannot happen, but never leave one open)
        if not row.done:
            _finish(row, "length")


def _decode_static(model: nn.Module, rows: list[_Row], input_ids: torch.Tensor, mask: torch.Tensor, chunk: int,
                   eos: set[int], pad: int, *, graphs: bool, compiled: bool = False) -> None:
    """The decode loop of :func:`generate` over a static KV cache: every row stays in the batch to the end.

    Each step is handed to the GPU before the host's bookkeeping of the tokens it is fed (stop strings, streamed
    text, grammars, :func:`_advance`), so the two overlap instead of the GPU waiting on the host: a row's next
    input is known once its token is chosen, and a row the bookkeeping then ends is never read again. The
    bookkeeping still comes before the next logits are read, so biases and grammar masks see every token.
    """
    from citi_engine.static_decode import StaticDecoder

    decoder = StaticDecoder(model, input_ids, mask, max(r.req.max_new_tokens for r in rows), graphs=graphs,
                            compiled=compiled)
    logits = decoder.prefill(chunk)
    live = list(range(len(rows)))
    for _ in range(decoder.length - decoder.width):
        view = logits if len(live) == len(rows) else logits.index_select(0, torch.tensor(live, device=logits.device))
        _bias_opening(view, [rows[i] for i in live])
        _constrain(view, [rows[i] for i in live])
        tokens = _next_tokens(view, [rows[i] for i in live])
        now = time.perf_counter()
        fed = [pad] * len(rows)  # finished rows are fed padding; their logits are never read again
        for b, i in enumerate(live):
            fed[i] = tokens[b]
        # No step for a batch whose every row ends here for certain (the common last step: no work thrown away);
        # when only the bookkeeping ends them all (a stop string, a finished grammar), one step is.
        ahead = None if all(_ends_at(rows[i], tokens[b], eos) for b, i in enumerate(live)) else decoder.step(fed)
        for b, i in enumerate(live):
            _advance(rows[i], tokens[b], eos, now)
        live = [i for i in live if not rows[i].done]
        if not live:
            break
        logits = ahead if ahead is not None else decoder.step(fed)
    for row in rows:
        if not row.done:
            _finish(row, "length")


def most_likely_prefix(model: nn.Module, prompt: list[int], options: list[list[int]], pad: int) -> list[int]:
    """The option the model finds most likely after ``prompt`` (summed log-probability; one batched forward)."""
    device = next(model.parameters()).device
    keep = max(len(o) for o in options)
    ids, mask = pad_left([prompt + o for o in options], pad, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1).logits
    logp = logits.float().log_softmax(-1)
    scores = []
    for i, o in enumerate(options):
        # logits at column c predict the token at column c+1; the option fills the last len(o) columns
        preds = logp[i, -(len(o) + 1):-1]
        scores.append(preds.gather(-1, torch.tensor(o, device=device).unsqueeze(-1)).sum().item())
    return options[max(range(len(options)), key=scores.__getitem__)]


def _bias_opening(logits: torch.Tensor, rows: list[_Row]) -> None:
    """Add each row's ``opening_bias`` to its logits while its reply is empty or whitespace (rows without a forced
    prefix: a forced prefix has already chosen how the reply starts)."""
    for b, row in enumerate(rows):
        if row.req.opening_bias and not row.prefix and not (row.ids and row.text().strip()):
            for token, bias in row.req.opening_bias.items():
                logits[b, token] += bias


def _constrain(logits: torch.Tensor, rows: list[_Row]) -> None:
    """Mask each constrained row's logits to the tokens its grammar allows next (one bitmask for all of them)."""
    constrained = [b for b, row in enumerate(rows) if row.matcher is not None and row.matcher.error is None]
    if not constrained:
        return
    bitmask = allocate_bitmask(len(constrained), rows[constrained[0]].req.grammar.vocab_size)
    for k, b in enumerate(constrained):
        rows[b].matcher.fill(bitmask, k)
    if len(constrained) == len(rows):
        apply_bitmask(logits, bitmask)
        return
    index = torch.tensor(constrained, device=logits.device)
    masked = logits.index_select(0, index)
    apply_bitmask(masked, bitmask)
    logits.index_copy_(0, index, masked)


def _next_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Greedy for the batch in one argmax; rows that sample draw with their own settings and generator."""
    chosen = logits.argmax(-1).tolist()
    for b, row in enumerate(rows):
        req = row.req
        if req.temperature > 0:
            chosen[b] = int(sample_tokens(logits[b:b + 1], req.temperature, req.top_p, row.generator).item())
    return chosen


def _ends_at(row: _Row, token: int, eos: set[int]) -> bool:
    """Whether :func:`_advance` will surely end ``row`` at ``token``, known without its text: cancelled, an end
    token it stops at, or its token budget. (Stop strings and grammars may end it too; this does not say.)"""
    req = row.req
    return (req.cancelled.is_set() or (token in eos and (not req.ignore_eos or row.matcher is not None))
            or len(row.ids) + 1 >= req.max_new_tokens)


def _advance(row: _Row, token: int, eos: set[int], now: float) -> None:
    req = row.req
    if req.cancelled.is_set():
        _finish(row, "cancelled")
        return
    if req.time_to_first_token is None:
        req.time_to_first_token = now - req.submitted_at
    if token in eos and (not req.ignore_eos or row.matcher is not None):
        row.ended_by_eos = True  # counted as a completion token, never shown as text
        _finish(row, "stop")
        return
    if row.matcher is not None and not row.matcher.accept(token):
        # Cannot happen with a mask from the same matcher; end the row rather than generate outside the grammar.
        log.error("token %d does not follow the request's grammar: %s", token, row.matcher.error)
        _finish(row, "stop")
        return
    row.add(token)
    text = row.text()
    if row.matcher is not None and row.matcher.finished:
        _finish(row, "stop", text)
        return
    for s in req.stop:
        at = text.find(s)
        if at >= 0:
            _finish(row, "stop", text[:at])
            return
    if len(row.ids) >= req.max_new_tokens:
        _finish(row, "length", text)
        return
    if req.on_text:
        upto = len(text) - held_back(text, req.stop)
        if upto > row.emitted:
            req.on_text(text[row.emitted:upto])
            row.emitted = upto


def _finish(row: _Row, reason: str, text: str | None = None) -> None:
    req = row.req
    text = row.text() if text is None else text
    text = text.rstrip("\ufffd") if reason != "length" else text
    if req.on_text and len(text) > row.emitted and reason != "cancelled":
        req.on_text(text[row.emitted:])
    row.emitted = len(text)
    req.text = req.prefix_text + text
    req.completion_tokens = len(row.prefix) + len(row.ids) + int(row.ended_by_eos)
    req.finish_reason = reason
    req.finished_at = time.perf_counter()
    row.done = True
