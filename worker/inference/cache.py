"""The inference server's model policy: which models and adapters stay loaded, and which requests share a batch.

The compute is the engine's serving runtime (:mod:`citi_engine.serving`); no web framework here, so
``bench/inference.py`` runs this on a GPU host that has torch alone.

- :class:`ModelCache` keeps each base model loaded once and an LRU cache of adapters
  (``CITI_ADAPTER_CACHE_SIZE``). An adapter is read from its directory by
  :func:`citi_engine.serving.read_adapter_modules` into a :class:`ServedAdapter`: replacement modules
  for just the components it changes (MOLoRA unmerged, UCO as the adapter's own copy of the layer, LoRA
  unmerged); the shared base is never written to. Anything the runtime does not split into modules (a
  full fine-tune, another peft method) is loaded as a model of its own.

  Activating an adapter swaps its modules into the base model (and back out for the next group):
  a few hundred attribute assignments, no copy of weights.

- :class:`Generator` activates a group's adapter and runs :func:`citi_engine.serving.generate` on it.

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
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from citi_engine.adapter import read_call_threshold
from citi_engine.molora import PEFT_TYPE_NAME
from citi_engine.serving import (
    GenerationRequest,
    adapter_base_spec,
    generate,
    read_adapter_modules,
    swap_modules,
)

__all__ = ["BatchScheduler", "GenerationRequest", "Generator", "ModelCache", "ServedAdapter", "ServedModel",
           "adapter_base_spec"]

log = logging.getLogger("citi.inference")


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
    call_threshold: float = 0.0  # calibration.json's: a bias of minus this on a call's first token (tool_choice auto)


@dataclass
class ServedModel:
    """What one request runs on: a base and, optionally, an adapter activated on it."""

    base: LoadedBase
    adapter: ServedAdapter | None = None
    call_threshold: float = 0.0

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
                 adapter_cache_size: int = 8, decode: str = "auto"):
        import torch

        from citi_engine import DECODE_MODES, resolve_decode
        from citi_engine.models import default_device

        if adapter_cache_size < 1:
            raise ValueError("CITI_ADAPTER_CACHE_SIZE must be at least 1")
        if decode not in DECODE_MODES:
            raise ValueError(f"CITI_INFERENCE_DECODE must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.device = device or default_device()
        # how generation decodes (citi_engine.serving.generate), ``auto`` resolved for this device
        self.decode = resolve_decode(decode, torch.device(self.device).type)
        self.dtype = dtype
        self.model_dirs = model_dirs
        self.adapter_cache_size = adapter_cache_size
        self._bases: dict[str, LoadedBase] = {}
        self._adapters: OrderedDict[str, ServedAdapter] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}

    # -- bases -------------------------------------------------------------------------------------

    @staticmethod
    def _prepare(model: nn.Module) -> None:
        """Frozen and in eval mode: the server only reads a model."""
        model.requires_grad_(False)
        model.eval()

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
            self._prepare(model)
            loaded = LoadedBase(spec=spec, model=model, tokenizer=tokenizer, device=self.device,
                                max_context=_max_context(model, tokenizer), load_seconds=time.perf_counter() - t0)
            log.info("loaded base model %s on %s in %.1fs", spec, self.device, loaded.load_seconds)
            with self._lock:
                self._bases[spec] = loaded
            return loaded

    def add_base(self, spec: str, model: Any, tokenizer: Any) -> LoadedBase:
        """Serve a model built in memory (benchmarks with random weights) under the name ``spec``."""
        self._prepare(model)
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
            return ServedModel(base=hit.own, call_threshold=hit.call_threshold)
        return ServedModel(base=self.base(hit.base_spec), adapter=hit, call_threshold=hit.call_threshold)

    def _load_adapter(self, adapter_id: str, adapter_dir: Path, base_spec: str | None) -> ServedAdapter:
        t0 = time.perf_counter()
        if not adapter_dir.is_dir():
            raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
        base_spec = base_spec or adapter_base_spec(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        peft_type = str(config.get("peft_type", "")).upper()
        adapter: ServedAdapter | None = None
        if peft_type in (PEFT_TYPE_NAME, "LORA"):
            read = read_adapter_modules(adapter_dir, self.base(base_spec).linears)
            if read is not None:
                kind, modules = read
                adapter = ServedAdapter(id=adapter_id, base_spec=base_spec, kind=kind, modules=modules)
        if adapter is None:
            adapter = ServedAdapter(id=adapter_id, base_spec=base_spec, kind="separate",
                                    own=self._load_separate(adapter_dir, base_spec))
        adapter.nbytes = sum(p.numel() * p.element_size() for m in adapter.modules.values()
                             for name, p in m.named_parameters() if not name.startswith("base."))
        adapter.load_seconds = time.perf_counter() - t0
        adapter.call_threshold = read_call_threshold(adapter_dir)
        log.info("loaded adapter %s (%s, %d modules, %.1f MB) in %.2fs", adapter_id, adapter.kind,
                 len(adapter.modules), adapter.nbytes / 1e6, adapter.load_seconds)
        return adapter

    def _load_separate(self, adapter_dir: Path, base_spec: str) -> LoadedBase:
        """A full fine-tune (or an adapter we cannot split into modules) as a model of its own."""
        from citi_engine.adapter import load_adapter

        t0 = time.perf_counter()
        model, tokenizer = load_adapter(str(adapter_dir), base=base_spec, device=self.device, dtype=self.dtype,
                                        model_dirs=self.model_dirs)
        self._prepare(model)
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
            swap_modules(base.model, {name: base.linears[name] for name in base.active.modules})
        if adapter is not None:
            swap_modules(base.model, adapter.modules)
        base.active = adapter


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


class Generator:
    """Runs one group of requests on one served model (see :func:`citi_engine.serving.generate`).

    Used from a single thread: it activates the group's adapter on the shared base before running.
    """

    def __init__(self, cache: ModelCache):
        self.cache = cache

    def run(self, served: ServedModel, requests: list[GenerationRequest]) -> None:
        """Generate for every request in ``requests`` (filling in their outcome fields)."""
        self.cache.activate(served)
        generate(served.base.model, served.base.tokenizer, requests, decode=self.cache.decode)

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
