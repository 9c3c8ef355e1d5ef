"""The torch side of the inference server: models loaded once, adapters hot-swapped, batched generation.

No web framework here, so ``bench/inference.py`` runs this on a GPU host that has torch alone.

- :class:`ModelCache` keeps each base model loaded once and an LRU cache of adapters
  (``CITI_ADAPTER_CACHE_SIZE``). An adapter is read from its directory into a :class:`ServedAdapter`:
  replacement modules for just the components it changes.

  * UCO components were fully fine-tuned, so their weights replace the base weights: the adapter keeps
    its own copy of just those modules (a plain ``nn.Linear``); the shared base is never written to.
  * MOLoRA components stay unmerged (:class:`MOLoRALinear`): the router decides per token how much
    of the experts to add, so there is no single weight to merge.
  * plain LoRA adapters (the ``lora`` baseline) become :class:`LoRALinear`.
  * anything else (a full fine-tune, an unknown peft type) is loaded as a model of its own.

  Activating an adapter swaps its modules into the base model (and back out for the next group):
  a few hundred attribute assignments, no copy of weights.

- :class:`Generator` runs batched generation for one group: left-padded prefill, then a decode loop
  with a KV cache, each request with its own sampling settings, stop strings, token budget and
  optional forced prefix, text deltas reported as they come (streaming).

- :class:`BatchScheduler` is the asyncio batching loop: it collects requests for a few milliseconds,
  groups them by (base model, adapter), and runs one group at a time in a single generation thread.

**One adapter per batch.** Requests for different adapters of one base do not share a batch. In a
CITI adapter the UCO modules are whole weight matrices that differ per adapter: a mixed batch would
have to split every UCO matmul by adapter anyway, and the MOLoRA layers would need per-row gathers of
expert and router weights (S-LoRA/Punica-style kernels) instead of the two dense matmuls they cost
now. With the handful of hot adapters a deployment of this service serves, one-adapter groups keep the
fast path for every row and the code simple; groups of different adapters take turns, oldest request
first, so no adapter starves. Base-model requests form their own groups on the untouched base.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("citi.inference")


# --------------------------------------------------------------------------------------------------
# Served adapter modules
# --------------------------------------------------------------------------------------------------


class MOLoRALinear(nn.Module):
    """A MOLoRA component for inference, unmerged.

    ``h = W0 x + sum_i G(x)[i] * (alpha/r) * B_i A_i x`` with ``G(x) = softmax(W_r x)`` and ``G(x)[0]``
    the backbone neuron (no expert). The router and the stacked ``A`` share one matmul; ``B`` carries the
    ``alpha/r`` scale already and its matmul adds onto the base output in place (``addmm``). A MOLoRA
    component thus costs the base matmul plus four kernels: router-and-A matmul, softmax, gate multiply,
    B matmul. At batch 1 decoding is bound by kernel launches and Python, not by arithmetic, so the
    forward is written with as few operations as possible.
    """

    def __init__(self, base: nn.Linear, router: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 num_experts: int, rank: int, scale: float):
        super().__init__()
        if router.shape != (num_experts + 1, base.in_features):
            raise ValueError(f"router weight has shape {tuple(router.shape)}, expected {(num_experts + 1, base.in_features)}")
        if a.shape != (num_experts * rank, base.in_features) or b.shape != (base.out_features, num_experts * rank):
            raise ValueError(f"expert weights have shapes {tuple(a.shape)} and {tuple(b.shape)}, which do not fit "
                             f"{num_experts} experts of rank {rank} on a {base.in_features}->{base.out_features} layer")
        self.base = base  # shared with the base model, never written to
        self.num_experts, self.rank = num_experts, rank
        w = base.weight
        self.router_a = nn.Parameter(torch.cat([router, a], 0).to(w.device, w.dtype), requires_grad=False)
        # stored transposed (d_in' x d_out) so addmm takes it as it is
        self.b_scaled_t = nn.Parameter((b.float() * scale).t().contiguous().to(w.device, w.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, r = self.num_experts, self.rank
        out = F.linear(x, self.base.weight, self.base.bias)
        ra = F.linear(x, self.router_a)
        # softmax of bf16 logits accumulates in fp32 inside the kernel; its bf16 output keeps 3 digits of each gate
        gates = ra[..., : n + 1].softmax(-1)
        mixed = ra[..., n + 1:].unflatten(-1, (n, r)) * gates[..., 1:, None]
        return torch.addmm(out.view(-1, out.shape[-1]), mixed.view(-1, n * r), self.b_scaled_t).view(out.shape)


class LoRALinear(nn.Module):
    """A plain LoRA component for inference, unmerged: ``W0 x + (alpha/r) B A x`` (``B`` pre-scaled)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        w = base.weight
        self.a = nn.Parameter(a.to(w.device, w.dtype), requires_grad=False)
        self.b_scaled_t = nn.Parameter((b.float() * scale).t().contiguous().to(w.device, w.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base.weight, self.base.bias)
        low = F.linear(x, self.a)
        return torch.addmm(out.view(-1, out.shape[-1]), low.view(-1, low.shape[-1]), self.b_scaled_t).view(out.shape)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# --------------------------------------------------------------------------------------------------
# The model cache
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedBase:
    """A base model loaded once, shared by every adapter made from it."""

    spec: str
    model: Any
    tokenizer: Any
    device: str
    max_context: int
    load_seconds: float
    active: ServedAdapter | None = None
    # The base's own linear layers by name, recorded at load: adapters are built on these and swapped back to
    # them, whatever adapter happens to be swapped in while another one loads.
    linears: dict[str, nn.Linear] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.linears:
            self.linears = {name: m for name, m in self.model.named_modules() if isinstance(m, nn.Linear)}


@dataclass
class ServedAdapter:
    """An adapter ready to serve: replacement modules by component name, or a model of its own.

    ``kind`` is ``citi`` (MOLoRA + UCO), ``lora``, or ``separate`` (a full fine-tune or any adapter this
    runtime cannot split into modules; ``own`` then holds its own :class:`LoadedBase`).
    """

    id: str
    base_spec: str
    kind: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    own: LoadedBase | None = None
    nbytes: int = 0
    load_seconds: float = 0.0


@dataclass
class ServedModel:
    """What one request runs on: a base and, optionally, an adapter activated on it."""

    base: LoadedBase
    adapter: ServedAdapter | None = None

    @property
    def key(self) -> tuple[int, str | None]:
        """Requests with the same key may share a batch."""
        return (id(self.base), self.adapter.id if self.adapter else None)

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def max_context(self) -> int:
        return self.base.max_context


def _max_context(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 10**8:  # HF uses a huge sentinel for "unset"
        limits.append(tok_limit)
    limits = [int(x) for x in limits if x]
    cap = os.environ.get("CITI_INFERENCE_MAX_CONTEXT")
    if cap:
        limits.append(int(cap))
    return min(limits) if limits else 2048


class ModelCache:
    """Base models loaded once (by spec) and an LRU cache of adapters (by id).

    Thread-safe: loads may run in a loader thread while the generation thread serves other groups.
    An evicted adapter stays alive for the requests that already hold it; its memory goes with the last.
    """

    def __init__(self, *, device: str | None = None, dtype: Any = None, model_dirs: list[str] | None = None,
                 adapter_cache_size: int = 8):
        from citi_engine.models import default_device

        if adapter_cache_size < 1:
            raise ValueError("CITI_ADAPTER_CACHE_SIZE must be at least 1")
        self.device = device or default_device()
        self.dtype = dtype
        self.model_dirs = model_dirs
        self.adapter_cache_size = adapter_cache_size
        self._bases: dict[str, LoadedBase] = {}
        self._adapters: OrderedDict[str, ServedAdapter] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}

    # -- bases -------------------------------------------------------------------------------------

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(key, threading.Lock())

    def base(self, spec: str) -> LoadedBase:
        """The base model for ``spec``, loaded on first use (raises ``ModelSpecError`` for a bad spec)."""
        with self._lock:
            if spec in self._bases:
                return self._bases[spec]
        with self._key_lock("base:" + spec):  # one load per spec even when many requests ask at once
            with self._lock:
                if spec in self._bases:
                    return self._bases[spec]
            from citi_engine.models import load_model

            t0 = time.perf_counter()
            model, tokenizer = load_model(spec, device=self.device, dtype=self.dtype, model_dirs=self.model_dirs)
            model.requires_grad_(False)
            loaded = LoadedBase(spec=spec, model=model, tokenizer=tokenizer, device=self.device,
                                max_context=_max_context(model, tokenizer), load_seconds=time.perf_counter() - t0)
            log.info("loaded base model %s on %s in %.1fs", spec, self.device, loaded.load_seconds)
            with self._lock:
                self._bases[spec] = loaded
            return loaded

    def add_base(self, spec: str, model: Any, tokenizer: Any) -> LoadedBase:
        """Serve a model built in memory (benchmarks with random weights) under the name ``spec``."""
        model.requires_grad_(False)
        model.eval()
        device = str(next(model.parameters()).device)
        loaded = LoadedBase(spec=spec, model=model, tokenizer=tokenizer, device=device,
                            max_context=_max_context(model, tokenizer), load_seconds=0.0)
        with self._lock:
            self._bases[spec] = loaded
        return loaded

    def loaded_bases(self) -> list[str]:
        """Specs of the base models in memory."""
        with self._lock:
            return list(self._bases)

    # -- adapters ----------------------------------------------------------------------------------

    def cached_adapters(self) -> list[str]:
        """Ids of the adapters in the cache, least recently used first."""
        with self._lock:
            return list(self._adapters)

    def adapter(self, adapter_id: str, adapter_dir: str | os.PathLike, base_spec: str | None = None) -> ServedModel:
        """The served model for an adapter, loading it from ``adapter_dir`` on a cache miss.

        ``base_spec`` defaults to the base recorded in the adapter directory (``citi_job.json``).
        """
        with self._lock:
            hit = self._adapters.get(adapter_id)
            if hit is not None:
                self._adapters.move_to_end(adapter_id)
        if hit is None:
            with self._key_lock("adapter:" + adapter_id):
                with self._lock:
                    hit = self._adapters.get(adapter_id)
                if hit is None:
                    hit = self._load_adapter(adapter_id, Path(adapter_dir), base_spec)
                    with self._lock:
                        self._adapters[adapter_id] = hit
                        while len(self._adapters) > self.adapter_cache_size:
                            evicted, _ = self._adapters.popitem(last=False)
                            log.info("evicted adapter %s from the cache", evicted)
        if hit.own is not None:
            return ServedModel(base=hit.own)
        return ServedModel(base=self.base(hit.base_spec), adapter=hit)

    def _load_adapter(self, adapter_id: str, adapter_dir: Path, base_spec: str | None) -> ServedAdapter:
        t0 = time.perf_counter()
        if not adapter_dir.is_dir():
            raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
        base_spec = base_spec or adapter_base_spec(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        peft_type = str(config.get("peft_type", "")).upper()
        adapter: ServedAdapter | None = None
        if peft_type in CITI_PEFT_TYPES or peft_type == "LORA":
            base = self.base(base_spec)
            modules = _read_adapter_modules(adapter_dir, config, base.linears)
            if modules is not None:
                adapter = ServedAdapter(id=adapter_id, base_spec=base_spec,
                                        kind="lora" if peft_type == "LORA" else "citi", modules=modules)
        if adapter is None:
            adapter = ServedAdapter(id=adapter_id, base_spec=base_spec, kind="separate",
                                    own=self._load_separate(adapter_dir, base_spec))
        adapter.nbytes = sum(p.numel() * p.element_size() for m in adapter.modules.values()
                             for name, p in m.named_parameters() if not name.startswith("base."))
        adapter.load_seconds = time.perf_counter() - t0
        log.info("loaded adapter %s (%s, %d modules, %.1f MB) in %.2fs", adapter_id, adapter.kind,
                 len(adapter.modules), adapter.nbytes / 1e6, adapter.load_seconds)
        return adapter

    def _load_separate(self, adapter_dir: Path, base_spec: str) -> LoadedBase:
        """A full fine-tune (or an adapter we cannot split into modules) as a model of its own."""
        from citi_engine.adapter import load_adapter

        t0 = time.perf_counter()
        model, tokenizer = load_adapter(str(adapter_dir), base=base_spec, device=self.device, dtype=self.dtype,
                                        model_dirs=self.model_dirs)
        model.requires_grad_(False)
        model.eval()
        return LoadedBase(spec=str(adapter_dir), model=model, tokenizer=tokenizer, device=self.device,
                          max_context=_max_context(model, tokenizer), load_seconds=time.perf_counter() - t0)

    # -- activation --------------------------------------------------------------------------------

    def activate(self, served: ServedModel) -> None:
        """Swap ``served.adapter``'s modules into its base (and the previous adapter's out).

        Called only from the generation thread, which is the only user of the models.
        """
        base, adapter = served.base, served.adapter
        if base.active is adapter:
            return
        if base.active is not None:
            for name in base.active.modules:
                _set_module(base.model, name, base.linears[name])
        if adapter is not None:
            for name, module in adapter.modules.items():
                _set_module(base.model, name, module)
        base.active = adapter


CITI_PEFT_TYPES = {"MOLORA"}  # citi_engine.molora.PEFT_TYPE_NAME, without importing peft


def adapter_base_spec(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter was trained on, as recorded in its directory."""
    adapter_dir = Path(adapter_dir)
    job = adapter_dir / "citi_job.json"
    if job.is_file():
        data = json.loads(job.read_text())
        spec = data.get("base_model") or (data.get("config") or {}).get("model")
        if spec:
            return spec
    config = adapter_dir / "adapter_config.json"
    if config.is_file():
        spec = json.loads(config.read_text()).get("base_model_name_or_path")
        if spec:
            return spec
    raise ValueError(f"adapter directory {adapter_dir} does not say which base model it belongs to "
                     "(no citi_job.json 'model' and no adapter_config.json 'base_model_name_or_path')")


_ADAPTER_PARAMS = (".molora_router", ".molora_A", ".molora_B", ".lora_A.", ".lora_B.")


def _peft_module_name(key: str) -> tuple[str, str]:
    """Split a peft state-dict key into (base module name, parameter name inside the adapter layer)."""
    key = key.removeprefix("base_model.model.")
    for marker in _ADAPTER_PARAMS:
        i = key.find(marker)
        if i >= 0:
            return key[:i], key[i + 1:]
    name, _, param = key.rpartition(".")
    return name, param


def _read_adapter_modules(adapter_dir: Path, config: dict, linears: dict[str, nn.Linear]) -> dict[str, nn.Module] | None:
    """Build the replacement modules of a CITI or LoRA adapter, or None when its format is not one we split.

    The names follow what peft saves for :mod:`citi_engine.molora` (``<module>.molora_router|A|B``), for
    peft LoRA (``<module>.lora_A.weight``/``lora_B.weight``) and for ``modules_to_save`` (the UCO
    components: ``<module>.weight``/``bias``, the whole trained layer).
    """
    from safetensors.torch import load_file

    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        return None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path), device="cpu").items():
        name, param = _peft_module_name(key)
        grouped.setdefault(name, {})[param] = tensor
    lora = str(config.get("peft_type", "")).upper() == "LORA"
    if lora and (config.get("use_dora") or config.get("rank_pattern")):
        return None  # variants the plain LoRALinear does not compute
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
            r = a.shape[0]
            alpha = float(config.get("lora_alpha", r))
            for pattern, value in (config.get("alpha_pattern") or {}).items():
                if name == pattern or name.endswith("." + pattern):
                    alpha = float(value)
            modules[name] = LoRALinear(base, a, b, alpha / r**0.5 if config.get("use_rslora") else alpha / r)
        elif not lora and set(params) == {"molora_router", "molora_A", "molora_B"}:
            n, r = int(config["num_experts"]), int(config["r"])
            modules[name] = MOLoRALinear(base, params["molora_router"], params["molora_A"], params["molora_B"],
                                         n, r, float(config["alpha"]) / r)
        else:
            log.warning("adapter %s: unexpected tensors %s for %s", adapter_dir, sorted(params), name)
            return None
    return modules


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


# --------------------------------------------------------------------------------------------------
# Batched generation
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """One request's generation settings and, once run, its outcome.

    ``prefix_options`` are forced starts of the assistant's text, as token ids: with one, generation
    continues from it; with several, the one the model finds most likely (summed log-probability) is
    used. ``on_text`` receives text deltas from the generation thread (the forced prefix first); text
    that might be the start of a stop string is held back until it is clear.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    prefix_options: list[list[int]] = field(default_factory=list)
    ignore_eos: bool = False
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

    def __init__(self, req: GenerationRequest, prefix: list[int], tokenizer, device: str):
        self.req = req
        self.prefix = prefix
        self.ids: list[int] = []
        self.emitted = 0  # characters of the generated text already sent through on_text
        self.done = False
        self.ended_by_eos = False
        self.tokenizer = tokenizer
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little"))

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)


def _forward_kwarg(model: Any) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes kwargs on
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.2x


def _held_back(text: str, stops: list[str]) -> int:
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


class Generator:
    """Runs one group of requests on one served model: prefill, then token-by-token decoding.

    Used from a single thread: it activates the group's adapter on the shared base before running.
    """

    def __init__(self, cache: ModelCache):
        self.cache = cache

    @torch.inference_mode()
    def run(self, served: ServedModel, requests: list[GenerationRequest]) -> None:
        """Generate for every request in ``requests`` (filling in their outcome fields)."""
        from citi_engine.generate import stop_token_ids

        self.cache.activate(served)
        model, tok = served.base.model, served.base.tokenizer
        device = served.base.device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = stop_token_ids(model, tok)
        cache_kw = _forward_kwarg(model)
        rows = []
        for req in requests:
            prefix = req.prefix_options[0] if len(req.prefix_options) == 1 else []
            if len(req.prefix_options) > 1:
                prefix = self._most_likely(model, req.prompt_ids, req.prefix_options, pad, device)
            rows.append(_Row(req, prefix, tok, device))
        for row in rows:
            row.req.prefix_text = tok.decode(row.prefix, skip_special_tokens=False) if row.prefix else ""
            if row.req.prefix_text and row.req.on_text:
                row.req.on_text(row.req.prefix_text)

        seqs = [r.req.prompt_ids + r.prefix for r in rows]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every row's next token lands in the last column
            input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        kv = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_kw: kv})
        next_pos = mask.sum(-1, keepdim=True)
        live = list(range(len(rows)))  # batch row -> index into rows
        budget = max(r.req.max_new_tokens for r in rows)
        for _ in range(budget):
            logits = out.logits[:, -1, :]
            tokens = self._sample(logits, [rows[i] for i in live])
            now = time.perf_counter()
            keep = []
            for b, i in enumerate(live):
                row = rows[i]
                self._advance(row, tokens[b], eos, now)
                if not row.done:
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
            out = model(input_ids=step, attention_mask=mask, position_ids=next_pos, use_cache=True,
                        **{cache_kw: kv})
            next_pos = next_pos + 1
        for row in rows:  # rows cut by the shared loop bound (cannot happen, but never leave one open)
            if not row.done:
                self._finish(row, "length")

    def _most_likely(self, model, prompt: list[int], options: list[list[int]], pad: int, device: str) -> list[int]:
        seqs = [prompt + o for o in options]
        width, keep = max(len(s) for s in seqs), max(len(o) for o in options)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1).logits
        logp = logits.float().log_softmax(-1)
        scores = []
        for i, o in enumerate(options):
            # logits at column c predict the token at column c+1; the option fills the last len(o) columns
            preds = logp[i, -(len(o) + 1):-1]
            scores.append(preds.gather(-1, torch.tensor(o, device=device).unsqueeze(-1)).sum().item())
        return options[max(range(len(options)), key=scores.__getitem__)]

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        chosen = logits.argmax(-1)
        sampled = [b for b, row in enumerate(rows) if row.req.temperature > 0]
        if not sampled:
            return chosen.tolist()
        chosen = chosen.tolist()
        for b in sampled:
            req = rows[b].req
            probs = (logits[b].float() / req.temperature).softmax(-1)
            if req.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep the smallest head whose mass reaches top_p (the top token always stays)
                cut = (sorted_p.cumsum(-1) - sorted_p) >= req.top_p
                sorted_p = sorted_p.masked_fill(cut, 0.0)
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            chosen[b] = int(torch.multinomial(probs, 1, generator=rows[b].generator).item())
        return chosen

    def _advance(self, row: _Row, token: int, eos: set[int], now: float) -> None:
        req = row.req
        if req.cancelled.is_set():
            self._finish(row, "cancelled")
            return
        if req.time_to_first_token is None:
            req.time_to_first_token = now - req.submitted_at
        if token in eos and not req.ignore_eos:
            row.ended_by_eos = True  # counted as a completion token, never shown as text
            self._finish(row, "stop")
            return
        row.ids.append(token)
        text = row.text()
        for s in req.stop:
            at = text.find(s)
            if at >= 0:
                self._finish(row, "stop", text[:at])
                return
        if len(row.ids) >= req.max_new_tokens:
            self._finish(row, "length", text)
            return
        if req.on_text:
            upto = len(text) - _held_back(text, req.stop)
            if upto > row.emitted:
                req.on_text(text[row.emitted:upto])
                row.emitted = upto

    def _finish(self, row: _Row, reason: str, text: str | None = None) -> None:
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


# --------------------------------------------------------------------------------------------------
# The batching loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    served: ServedModel
    request: GenerationRequest
    future: asyncio.Future


class BatchScheduler:
    """Collects requests for up to ``max_wait_ms``, groups them by served model, runs one group at a time.

    Groups run in a single generation thread (one accelerator, one stream of work); the oldest waiting
    request decides which group goes next. A group holds at most ``max_batch_size`` requests; the rest
    wait for the next round. Requests arriving while a group runs are batched together afterwards.
    """

    def __init__(self, cache: ModelCache, *, max_batch_size: int = 16, max_wait_ms: float = 5.0):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.cache = cache
        self.generator = Generator(cache)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citi-generate")
        self._pending: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches_run = 0
        self.batch_sizes: list[int] = []

    async def submit(self, served: ServedModel, request: GenerationRequest) -> GenerationRequest:
        """Queue ``request`` and wait until it is generated; returns it with its outcome filled in."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        pending = _Pending(served, request, loop.create_future())
        self._pending.append(pending)
        self._wake.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            request.cancelled.set()  # the client went away: the row stops at its next token
            raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.max_wait_s)  # let concurrent requests arrive and share the batch
            self._wake.clear()
            while self._pending:
                key = self._pending[0].served.key
                group = [p for p in self._pending if p.served.key == key][: self.max_batch_size]
                taken = {id(p) for p in group}
                self._pending = [p for p in self._pending if id(p) not in taken]
                group = [p for p in group if not p.future.done()]
                if not group:
                    continue
                self.batches_run += 1
                self.batch_sizes.append(len(group))
                try:
                    await loop.run_in_executor(self.executor, self.generator.run, group[0].served,
                                               [p.request for p in group])
                except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
                    log.exception("generation failed for a batch of %d", len(group))
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p in group:
                    if not p.future.done():
                        p.future.set_result(p.request)

    async def close(self) -> None:
        """Stop the loop and the generation thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)
