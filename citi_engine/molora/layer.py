"""The MOLoRA layer: a frozen linear layer plus N routed LoRA experts (method page, section 3).

    G(x) = softmax(W_r x)                                  W_r in R^{(N+1) x d_in}, no bias
    h    = W0 x + sum_{i=1..N} G(x)[i] * (alpha/r) * B_i A_i x

G(x)[0] is the backbone neuron: it has no expert and only takes probability mass away from them. With the
``sigmoid`` gate (not in the paper) the backbone's share is a sigmoid of its own logit and the experts share the
rest by a softmax among themselves, G(x) = [s, (1 - s) softmax(l_1..l_N)] with s = sigmoid(l_0): still weights
that add up to 1, but the backbone's share no longer moves when the experts' logits do (:func:`router_gates`).
The experts are computed fused, like one LoRA of rank N*r: A = [A_1; ...; A_N] is (N*r x d_in),
B = [B_1 ... B_N] is (d_out x N*r), and the N*r intermediate is scaled by each expert's gate
(repeated over its r rows). No Python loop over experts, no per-expert tensors.

One formula, two layers: :func:`molora_mix` (G(x) and the gated expert inputs) is the method's math,
and both layers below compute through it. :class:`MoloraLinear` is the peft layer that trains and
saves (fp32 adapter weights, dropout, router probabilities kept for the routing loss; without
dropout the router and A share one matmul, as in serving); :class:`FrozenMoloraLinear` is the same
adapter frozen for serving (``citi_engine.serving``), laid out for few kernels: the router and A
are one weight, B carries alpha/r and adds onto the base output in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from citi_engine import ROUTING_GATES

from . import fused
from .config import MoloraConfig


def router_gates(logits: torch.Tensor, gate: str = "softmax", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G(x) from the router's logits W_r x (..., N+1), in at least ``dtype``: ``softmax`` over all N+1 (the
    paper's), or ``sigmoid``: [s, (1 - s) * softmax(l_1..l_N)] with s = sigmoid(l_0), so the backbone's share
    depends on its own logit alone and the experts' logits only decide how the rest is shared."""
    dtype = torch.promote_types(logits.dtype, dtype)
    if gate == "softmax":
        return torch.softmax(logits, dim=-1, dtype=dtype)
    if gate != "sigmoid":
        raise ValueError(f"gate must be one of {', '.join(ROUTING_GATES)}, got {gate!r}")
    backbone = torch.sigmoid(logits[..., :1].to(dtype))
    experts = torch.softmax(logits[..., 1:], dim=-1, dtype=dtype)
    return torch.cat([backbone, (1.0 - backbone) * experts], dim=-1)


def molora_mix(
    logits: torch.Tensor,
    h: torch.Tensor,
    num_experts: int,
    r: int,
    scaling: float = 1.0,
    probs_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype | None = None,
    detach_gates: bool = False,
    gate: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """G(x) (:func:`router_gates` of W_r x) and each expert's A_i x times scaling * G(x)[i]; the caller applies B.

    ``logits`` is W_r x (..., N+1), ``h`` is A x (..., N*r). Returns ``(mixed, gates)``: ``mixed``
    (..., N*r), so that ``B mixed`` is the MOLoRA delta, and ``gates`` = G(x) computed in at least
    ``probs_dtype`` (fp32 for the routing loss; serving passes the logits' dtype: the softmax kernel
    accumulates in fp32 either way). ``dtype`` is the dtype of the gate factors (default: ``h``'s).
    ``detach_gates``: ``mixed`` takes the gates without their gradient (the same values), so a loss on the
    layer's output trains the experts and not the router; ``gates`` keeps it for the routing terms.
    """
    gates = router_gates(logits, gate, probs_dtype)  # G(x): (..., N+1)
    expert_gates = gates[..., 1:]  # drop the backbone neuron G(x)[0]
    if detach_gates:
        expert_gates = expert_gates.detach()
    if scaling != 1.0:
        expert_gates = expert_gates * scaling
    expert_gates = expert_gates.to(dtype or h.dtype)
    mixed = (h.unflatten(-1, (num_experts, r)) * expert_gates.unsqueeze(-1)).flatten(-2)  # expert i's r rows times G(x)[i]
    return mixed, gates


class MoloraLayer(BaseTunerLayer):
    """Adapter state of a MOLoRA layer, one entry per adapter name in each container."""

    # Everything trainable; peft saves, loads and freezes these by name.
    adapter_layer_names = ("molora_router", "molora_A", "molora_B")
    other_param_names = ("num_experts", "r", "scaling", "gate", "molora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.molora_router = nn.ParameterDict({})  # W_r: (N+1, d_in)
        self.molora_A = nn.ParameterDict({})  # A_1..A_N stacked: (N*r, d_in)
        self.molora_B = nn.ParameterDict({})  # B_1..B_N side by side: (d_out, N*r)
        self.molora_dropout = nn.ModuleDict({})
        self.num_experts: dict[str, int] = {}
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.gate: dict[str, str] = {}  # how the router's logits become G(x): router_gates
        # G(x) of the last forward per adapter, (..., N+1); kept for the routing loss. A plain dict, so it
        # is neither a parameter nor saved.
        self.router_probs: dict[str, torch.Tensor] = {}
        # Training only, not saved (hyperparameters.routing_detach): the output takes G(x) without its gradient.
        self.detach_router = False
        # Training only, not saved (hyperparameters.routing_detach_input): the router reads x without its gradient.
        self.detach_router_input = False
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MOLoRA adapts nn.Linear layers only, not {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: MoloraConfig) -> None:
        """Create (or re-create) the experts and router of ``adapter_name``, in fp32 on the base layer's device."""
        n, r = config.num_experts, config.r
        device = self.get_base_layer().weight.device
        # fp32 master copies even when the base runs in bf16: adapter updates are small and bf16 would round them away.
        self.molora_router[adapter_name] = nn.Parameter(torch.empty(n + 1, self.in_features, device=device))
        self.molora_A[adapter_name] = nn.Parameter(torch.empty(n * r, self.in_features, device=device))
        self.molora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, n * r, device=device))
        self.molora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.num_experts[adapter_name] = n
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.alpha / r
        self.gate[adapter_name] = config.gate
        self.reset_parameters(adapter_name, config.init_weights)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter to the base layer's device, keeping its fp32 dtype (peft's version casts to the base dtype)."""
        device = device if device is not None else self.get_base_layer().weight.device
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].device.type != "meta":
                container[adapter_name].data = container[adapter_name].data.to(device)

    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """A_i Kaiming-uniform (each expert on its own fan-in, as a LoRA A), B_i zero, router Kaiming-uniform."""
        with torch.no_grad():
            n, r = self.num_experts[adapter_name], self.r[adapter_name]
            # (N*r, d_in) viewed as N experts: kaiming_uniform_ only looks at fan-in = d_in, same for each A_i.
            nn.init.kaiming_uniform_(self.molora_A[adapter_name], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.molora_router[adapter_name], a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.molora_B[adapter_name])
            else:
                B = self.molora_B[adapter_name].view(self.out_features, n, r)
                for i in range(n):  # init only, never in forward
                    nn.init.kaiming_uniform_(B[:, i], a=math.sqrt(5))


class MoloraLinear(nn.Module, MoloraLayer):
    """An ``nn.Linear`` with MOLoRA experts on top."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoloraConfig, **kwargs: Any) -> None:
        super().__init__()
        MoloraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def molora_delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """sum_i G(x)[i] * (alpha/r) * B_i A_i x for one adapter; records G(x) in ``router_probs``."""
        W_r, A, B = self.molora_router[adapter], self.molora_A[adapter], self.molora_B[adapter]
        n, r = self.num_experts[adapter], self.r[adapter]
        if not torch.is_autocast_enabled(x.device.type):
            x = self._cast_input_dtype(x, A.dtype)  # compute in the adapter's fp32 unless autocast decides
        dropout = self.molora_dropout[adapter]
        if self.detach_router_input:
            # The same values; the router's gradient stops at its own weights, so the routing terms cannot reshape
            # the layers below to make routing easier. Two matmuls: x's gradient comes from the experts alone.
            logits, h = F.linear(x.detach(), W_r), F.linear(dropout(x), A)
        elif isinstance(dropout, nn.Identity) or not dropout.training:
            # Router and experts read the same x: one matmul over [W_r; A] ((N+1+N*r) x d_in) reads it once forward
            # and once for both weight gradients, and gives x's gradient in one matmul. The parameters stay apart
            # (saved adapters, peft's names, the optimizer); only this forward joins them.
            logits, h = F.linear(x, torch.cat([W_r, A])).split([n + 1, n * r], dim=-1)  # W_r x, all A_i x
        else:
            logits, h = F.linear(x, W_r), F.linear(dropout(x), A)  # the router sees x without dropout
        mixed, self.router_probs[adapter] = molora_mix(logits, h, n, r, self.scaling[adapter], dtype=x.dtype,
                                                       detach_gates=self.detach_router, gate=self.gate[adapter])
        return F.linear(mixed, B)  # sum over experts of B_i (...): (..., d_out)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # W0 x
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter in self.molora_A:
                result = result + self.molora_delta(x, adapter).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "MOLoRA cannot be merged into the base weights: its experts are weighted by an input-dependent router"
        )

    def unmerge(self) -> None:
        """Nothing to undo: MOLoRA layers are never merged."""

    def __repr__(self) -> str:
        return "molora." + super().__repr__()


# Rows of the serving layer's router-and-A weight are padded with zeros to a multiple of this (1: none). At 16 rows
# on an H100, cuBLAS took 13 us for the 1B shape's (16 x 2048) @ (2048 x 37) router-and-A matmul (a small-N kernel,
# gemmSN_TN) and 4.9 us with the rows padded to 16 or 64 (a Hopper tensor-core kernel); at one row 4.3 against
# 4.9 us. The 1B decode step at 16 rows lost a third of the adapter's cost (+23% -> +12% over the base) and the
# step at one row did not change (bench/results/inference_raw/adapteralign_h100_s14/, fourteenth session).
ROUTER_ALIGN = 64

# Off by default, an experiment for the compiled decode step at batch 1 (bench/serving_step.py --compiled
# --one-row-reductions): there the adapter's three kernels a component (the router-and-A matmul, the gates, the B
# matmul onto the base output) cost +19% over the base model on an H100 (1B shape, fourteenth session), each a few
# microseconds of fixed cost. With one row and torch.compile tracing, the two matmuls are written as reductions, so
# inductor can inline the gates (a softmax over N+1 values, unrolled) and the add into the B product's kernel: two
# kernels instead of three. Eager and multi-row forwards never take this path.
ONE_ROW_REDUCTIONS = False

# Off by default, an experiment for decoding on a GPU, where a small model's step is bound by kernel count: the
# MOLoRA components that read the same input (a layer's q, k and v projections; its gate and up projections) get
# their router-and-A products from one matmul over their weights stacked, and their gates from one softmax and one
# multiply, so a group of three costs 3 + 3 kernels beside the base matmuls instead of 4 x 3 (only the B products
# stay apart). A job's default adapter has MOLoRA on half of SmolLM2's components, and served over HTTP with CUDA
# graphs it cost +40% a token on an H100 (fifteenth session). :func:`link_shared_inputs` makes the groups (when
# this is on at the adapter's load); torch.compile traces take each component's own path.
SHARED_INPUT_GROUPS = False
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# On: a decode step's few rows take the adapter's four kernels as one Triton kernel (:mod:`citi_engine.molora.fused`)
# where Triton runs (CUDA tensors; any tensor under its interpreter); prefills, eager CPU work, torch.compile traces
# and shared-input groups keep the four. Off by default until a GPU has timed it end to end against the four
# (bench/gpu_open_measurements.sh, PARTS=fused; tested on CPU under Triton's interpreter only).
FUSED_DELTA = False


class FrozenMoloraLinear(nn.Module):
    """A trained MOLoRA adapter on a shared, frozen ``nn.Linear``, for serving: ``W0 x + B molora_mix(W_r x, A x)``.

    Built from the tensors :class:`MoloraLinear` saves. The base layer is shared with the base model and
    never written to. The router and the stacked ``A`` are one weight (one matmul), ``B`` is stored
    transposed and pre-scaled by alpha/r so ``addmm`` adds it onto the base output in place: at batch 1
    decoding is bound by kernel launches, so the component costs the base matmul plus four kernels
    (router-and-A matmul, softmax, gate multiply, B matmul), or plus one where a decode step's few rows go to
    :func:`~citi_engine.molora.fused.molora_add_` (:data:`FUSED_DELTA`). Weights take the base layer's dtype. ``align``
    (default :data:`ROUTER_ALIGN`) pads the router-and-A weight with zero rows to a multiple of it, for a matmul
    shape the GPU's kernels handle better; the padded outputs are never read.
    """

    def __init__(self, base: nn.Linear, router: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 num_experts: int, r: int, scaling: float, gate: str = "softmax", align: int | None = None) -> None:
        super().__init__()
        if router.shape != (num_experts + 1, base.in_features):
            raise ValueError(f"router weight has shape {tuple(router.shape)}, expected {(num_experts + 1, base.in_features)}")
        if a.shape != (num_experts * r, base.in_features) or b.shape != (base.out_features, num_experts * r):
            raise ValueError(f"expert weights have shapes {tuple(a.shape)} and {tuple(b.shape)}, which do not fit "
                             f"{num_experts} experts of rank {r} on a {base.in_features}->{base.out_features} layer")
        self.base = base
        if gate not in ROUTING_GATES:
            raise ValueError(f"gate must be one of {', '.join(ROUTING_GATES)}, got {gate!r}")
        self.num_experts, self.r, self.gate = num_experts, r, gate
        w = base.weight
        router_a = torch.cat([router, a], 0)
        align = ROUTER_ALIGN if align is None else align
        pad = -router_a.shape[0] % max(align, 1)
        if pad:
            router_a = torch.cat([router_a, router_a.new_zeros(pad, router_a.shape[1])], 0)
        self.router_a = nn.Parameter(router_a.to(w.device, w.dtype), requires_grad=False)
        b_scaled = b.to(torch.promote_types(b.dtype, torch.float32)) * scaling  # scaled in fp32 or finer, then cast
        self.b_scaled_t = nn.Parameter(b_scaled.t().contiguous().to(w.device, w.dtype), requires_grad=False)
        self.shared_input: SharedInputGroup | None = None  # see link_shared_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_experts
        out = F.linear(x, self.base.weight, self.base.bias)
        compiling = torch.compiler.is_compiling()
        if FUSED_DELTA and not compiling and self.shared_input is None and fused.usable(x):
            try:
                return fused.molora_add_(out, x, self.router_a, self.b_scaled_t, n, self.r, self.gate)
            except Exception as exc:  # noqa: BLE001 - a Triton that cannot build the kernel here: the four kernels
                fused.give_up(exc)
                out = F.linear(x, self.base.weight, self.base.bias)
        if ONE_ROW_REDUCTIONS and x.numel() == x.shape[-1] and compiling:
            return out + self._one_row_delta(x).view(out.shape)
        if self.shared_input is not None and not compiling:
            mixed = self.shared_input.mixed(self, x)
        else:
            ra = F.linear(x, self.router_a)
            mixed, _ = molora_mix(ra[..., : n + 1], ra[..., n + 1: n + 1 + n * self.r], n, self.r,
                                  probs_dtype=ra.dtype, gate=self.gate)
        return torch.addmm(out.view(-1, out.shape[-1]), mixed.reshape(-1, mixed.shape[-1]),
                           self.b_scaled_t).view(out.shape)

    def _one_row_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The MOLoRA delta of one row as reductions (:data:`ONE_ROW_REDUCTIONS`): ``(d_out,)``."""
        n, r = self.num_experts, self.r
        ra = (x.reshape(1, -1) * self.router_a[: n + 1 + n * r]).sum(-1)  # W_r x and A x, padding rows left out
        mixed, _ = molora_mix(ra[: n + 1], ra[n + 1:], n, r, probs_dtype=ra.dtype, gate=self.gate)
        return (mixed.unsqueeze(-1) * self.b_scaled_t).sum(0)  # B (gates * A x), summed over the N*r rows


class SharedInputGroup:
    """MOLoRA components that read the same input, their router-and-A weights stacked (:data:`SHARED_INPUT_GROUPS`).

    The first member called with an input computes every member's gated expert inputs at once and keeps them until
    each other member has taken its own (the same tensor, unchanged since: its identity and, outside inference
    mode, its version counter are checked); a member called with any other input computes them afresh. Nothing is kept once all have taken theirs.
    """

    def __init__(self, members: list[FrozenMoloraLinear]) -> None:
        first = members[0]
        self.members = members
        self.n, self.r, self.gate = first.num_experts, first.r, first.gate
        self.rows = first.router_a.shape[0]  # each member's padded rows
        # the stacked weight is a buffer of the first member, so it moves with the model (not saved: derived)
        first.register_buffer("shared_router_a", torch.cat([m.router_a for m in members], 0), persistent=False)
        self._index = {id(m): i for i, m in enumerate(members)}
        self._clear()

    def _clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._version = -1
        self._mixed: torch.Tensor | None = None
        self._waiting: set[int] = set()

    def mixed(self, member: FrozenMoloraLinear, x: torch.Tensor) -> torch.Tensor:
        """``member``'s gated expert inputs for ``x`` (..., N*r), a view into the group's."""
        i = self._index[id(member)]
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if not (i in self._waiting and self._x is x and version == self._version):
            n, r = self.n, self.r
            ra = F.linear(x, self.members[0].shared_router_a).unflatten(-1, (len(self.members), self.rows))
            mixed, _ = molora_mix(ra[..., : n + 1], ra[..., n + 1: n + 1 + n * r], n, r, probs_dtype=ra.dtype,
                                  gate=self.gate)
            self._x, self._version, self._mixed = x, version, mixed
            self._waiting = set(range(len(self.members)))
        mixed = self._mixed[..., i, :]
        self._waiting.discard(i)
        if not self._waiting:
            self._clear()
        return mixed


def link_shared_inputs(modules: dict[str, nn.Module]) -> list[SharedInputGroup]:
    """Group the :class:`FrozenMoloraLinear` modules of ``modules`` (by module name) that read the same input
    (:data:`SHARED_INPUT_SIBLINGS` under one parent, the same experts, rank, gate, padding, dtype and device);
    each member then computes through its group. Returns the groups (two members or more)."""
    by_key: dict[tuple, list[FrozenMoloraLinear]] = {}
    for name, module in modules.items():
        if not isinstance(module, FrozenMoloraLinear):
            continue
        parent, _, child = name.rpartition(".")
        family = next((i for i, names in enumerate(SHARED_INPUT_SIBLINGS) if child in names), None)
        if family is None:
            continue
        w = module.router_a
        key = (parent, family, module.num_experts, module.r, module.gate, w.shape, w.dtype, w.device)
        by_key.setdefault(key, []).append(module)
    groups = []
    for members in by_key.values():
        if len(members) > 1:
            group = SharedInputGroup(members)
            for m in members:
                m.shared_input = group
            groups.append(group)
    return groups
