"""Decoding over a static KV cache, replayed from a captured CUDA graph on a GPU: the serving runtime's
fast path (:func:`citi_engine.serving.generate` with ``decode="static"`` or ``"cuda_graphs"``).

Why: at these model sizes a decode step is a few hundred small kernels launched one by one from Python, and
the GPU waits on the host (SmolLM2-135M on an H100: 16-26 ms a token, where reading its weights takes well
under one). A CUDA graph records one step's kernels once and replays them with a single launch. A graph
needs fixed shapes and fixed memory, so everything a step touches is allocated once per batch:

- the KV cache is transformers' ``StaticCache``, long enough for the batch's prompts and new tokens; each
  layer keeps its write position in a device tensor that the step advances in place;
- the step reads its inputs from fixed tensors (each row's token and position, and the cache column it
  writes) that are filled before each replay, and builds each row's mask of visible keys on the device
  from them; the mask goes to the model as a 4-D tensor, which transformers uses as it is (no mask building
  and no host synchronisation inside the step);
- rows stay in the batch until the last one finishes (a finished row is fed padding and ignored);
- a step attends each row's one query token to its key/value heads without copying them per query head
  (:mod:`citi_engine.decode_attention`; transformers' sdpa copies them whenever a mask is passed).

The first decode step runs eagerly on a side stream (it warms the kernels and the allocator up), the second
is captured, and every later one replays it. Without CUDA, or with graphs off, the same static steps run
eagerly; the CPU tests pin that path, token for token, to the dynamic-cache path.

``compiled``: the step goes through ``torch.compile`` first, so the graph replays fused kernels (a norm, the
rotary embedding, an activation each become one or two kernels instead of several): at these sizes a step is
mostly small kernels, each with a floor of a few microseconds. The compiled step is made once per process and
shared by every batch; a batch of a new shape compiles again, once with dynamic sizes after the first, as does a
batch on another adapter's modules (torch's limit of compiled versions of one function applies: past it the step
runs as written), and a step that cannot be compiled runs as written (logged once).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from citi_engine.generate import _forward_names

log = logging.getLogger("citi.static_decode")
_COMPILED_STEP = None  # torch.compile of StaticDecoder._step, made on first use
# Decode steps attend with citi_engine.decode_attention's grouped attention (no copy of keys and values per query
# head). Benchmarks that time the attention before it set this to False.
GROUPED_ATTENTION = True


class StaticDecoder:
    """Prefill and decode steps of one left-padded batch over a static KV cache (see the module's text).

    ``input_ids`` and ``mask`` are the batch (rows x columns, left padding, as
    :func:`citi_engine.generate.pad_left` gives them); the cache holds ``columns + max_new_tokens`` positions.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *,
                 graphs: bool = False, compiled: bool = False):
        from transformers import StaticCache

        self.model = model
        self.rows, self.width = input_ids.shape
        self.length = self.width + max_new_tokens
        device = input_ids.device
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache = StaticCache(config=inner.config, max_cache_len=self.length)
        self.cache_name, self.keeps_logits = _forward_names(model)
        self.input_ids, self.mask = input_ids, mask.bool()
        # Keys a row may see: its real prompt columns, then every column a generated token is written to.
        self.visible = torch.cat([self.mask, self.mask.new_ones((self.rows, max_new_tokens))], dim=1)
        self.columns = torch.arange(self.length, device=device)
        # The step's fixed inputs: each row's token, its position (real tokens before it), the cache column.
        self.token = torch.zeros((self.rows, 1), dtype=torch.long, device=device)
        self.position = self.mask.sum(-1, keepdim=True).long()
        self.column = torch.full((1,), self.width, dtype=torch.long, device=device)
        self.graphs = graphs and device.type == "cuda"
        self.compiled = compiled
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.steps = 0

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask4d: torch.Tensor) -> torch.Tensor:
        kwargs = {self.cache_name: self.cache}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask4d, use_cache=True,
                         **kwargs)
        return out.logits[:, -1, :]

    def prefill(self, chunk: int) -> torch.Tensor:
        """Feed the prompts into the cache ``chunk`` columns per forward (0: all at once); the last column's logits."""
        positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        step = chunk if chunk > 0 else self.width
        logits = None
        for start in range(0, self.width, step):
            end = min(start + step, self.width)
            queries = self.columns[start:end].view(1, -1, 1)
            keys = self.columns.view(1, 1, -1)
            # Query column q sees key column k when k <= q and k holds a real token; a padding column sees only
            # itself (a query that sees nothing would come out NaN and reach real rows through its cached values).
            mask4d = ((keys <= queries) & self.visible[:, None, :]) | (keys == queries)
            logits = self._forward(self.input_ids[:, start:end], positions[:, start:end], mask4d[:, None])
        return logits.float()

    def _step(self) -> torch.Tensor:
        mask4d = (self.visible & (self.columns <= self.column)).view(self.rows, 1, 1, self.length)
        return self._forward(self.token, self.position, mask4d)

    def _run_step(self) -> torch.Tensor:
        from citi_engine.decode_attention import decode_attention

        with decode_attention(self.model) if GROUPED_ATTENTION else contextlib.nullcontext():
            return self._compiled_or_plain_step()

    def _compiled_or_plain_step(self) -> torch.Tensor:
        if not self.compiled:
            return self._step()
        global _COMPILED_STEP
        if _COMPILED_STEP is None:
            _COMPILED_STEP = torch.compile(StaticDecoder._step)
        try:
            return _COMPILED_STEP(self)
        except Exception as exc:  # noqa: BLE001 - a step torch.compile cannot take runs as written, never fails a request
            log.warning("torch.compile of the decode step failed, decoding without it: %s", exc)
            self.compiled = False
            return self._step()

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (finished rows: any id) and return the next logits (rows x vocabulary, fp32)."""
        self.token.copy_(torch.tensor(tokens, dtype=torch.long).view(-1, 1), non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits
        elif self.graphs and self.steps == 1:
            logits = self._capture()
        elif self.graphs:  # the first step: eager, on a side stream, so the capture finds everything warm
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._run_step()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            logits = self._run_step()
        self.steps += 1
        out = logits.float()
        self.position += 1
        self.column += 1
        return out

    def _capture(self) -> torch.Tensor:
        """Record one step into a CUDA graph and replay it; if capture fails, go on eagerly (logged once)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._run_step()
        except Exception as exc:  # noqa: BLE001 - any capture failure means "run eagerly", never a failed request
            log.warning("CUDA graph capture failed, decoding without graphs: %s", exc)
            self.graphs = False
            return self._run_step()
        self.graph, self.graph_logits = graph, logits
        graph.replay()
        return logits
