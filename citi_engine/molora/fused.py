"""One GPU kernel for a served MOLoRA component's delta, added onto the base output in place.

Decoding a small model on a GPU is bound by how many kernels a step launches, not by arithmetic: the served
layer (:class:`~citi_engine.molora.layer.FrozenMoloraLinear`) costs its base matmul plus four kernels (the
router-and-A matmul, the softmax, the gate multiply, the B matmul onto the output), and with MOLoRA on half of
SmolLM2's components that made a token about 35% dearer than the base model's on an H100 with CUDA graphs
(seventeenth session). :func:`molora_add_` does the four in one Triton kernel, for the few rows of a decode step:

    out += B_s (G(x)[1:] repeated r times * A x)        G(x) = router_gates(W_r x), B_s = (alpha/r) B

Each program takes a block of rows and a block of output columns. It computes W_r x and A x for its rows
itself (the router-and-A weight is a few dozen rows: every program reading it again costs less than a
second launch), the gates in fp32 (softmax, or the sigmoid gate of :func:`~citi_engine.molora.layer.router_gates`),
spreads each expert's gate over its r columns with a one-hot product, and adds its tile of B_s times the gated
inputs onto ``out``. Unlike the four-kernel path, the gated inputs stay in fp32 until they meet B_s (rounded once,
to the weights' dtype), so the two agree to the weights' rounding, not bit for bit.

Triton is optional: without it (or on a CPU) the layer keeps its four kernels. With ``TRITON_INTERPRET=1`` set
before this module is imported, Triton's interpreter runs the kernel on CPU tensors (the tests do).
"""

from __future__ import annotations

import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton comes with CUDA builds of torch
    triton = None

log = logging.getLogger(__name__)
# Triton's interpreter (numpy on the CPU) runs the kernel on CPU tensors, for tests; read once, as Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AVAILABLE = triton is not None
# More rows than this (a prefill) take the four-kernel path: there the matmuls dominate, and cuBLAS does them better.
MAX_ROWS = 64
_BLOCK_M = 16  # tl.dot wants every dimension at least 16
_BLOCK_K = 64
_BLOCK_D = 128


def give_up(exc: BaseException) -> None:
    """Stop using the kernel in this process (the layers go back to their four kernels) after it failed, e.g. a
    Triton that cannot compile it for this card; logged once, with the reason."""
    global AVAILABLE
    if AVAILABLE:
        log.warning("the fused MOLoRA kernel failed, serving with four kernels a component from now on: %s", exc)
    AVAILABLE = False


def usable(x: torch.Tensor) -> bool:
    """Whether :func:`molora_add_` can take ``x`` (..., d_in): Triton present, a CUDA tensor (any tensor under
    the interpreter), few enough rows, a contiguous last dimension, and no gradient asked for (the kernel has no
    backward: serving only)."""
    return (AVAILABLE and (x.is_cuda or INTERPRET) and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
            and x.stride(-1) == 1 and not (torch.is_grad_enabled() and x.requires_grad))


if AVAILABLE:

    @triton.jit
    def _molora_add_kernel(x_ptr, ra_ptr, bt_ptr, out_ptr, M, K, D,
                           stride_xm, stride_ra, stride_bt, stride_om,
                           N_EXPERTS: tl.constexpr, R: tl.constexpr, SIGMOID: tl.constexpr,
                           G_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        g = tl.arange(0, G_BLOCK)  # router rows: the backbone neuron, then the N experts
        h = tl.arange(0, H_BLOCK)  # A's rows: expert i's r rows are i*r .. i*r + r - 1
        g_ok = g < N_EXPERTS + 1
        h_ok = h < N_EXPERTS * R
        logits = tl.zeros((BLOCK_M, G_BLOCK), dtype=tl.float32)
        ax = tl.zeros((BLOCK_M, H_BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xk = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                         mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
            wr = tl.load(ra_ptr + g[None, :] * stride_ra + ks[:, None], mask=g_ok[None, :] & k_ok[:, None], other=0.0)
            wa = tl.load(ra_ptr + (N_EXPERTS + 1 + h)[None, :] * stride_ra + ks[:, None],
                         mask=h_ok[None, :] & k_ok[:, None], other=0.0)
            logits = tl.dot(xk, wr, logits)
            ax = tl.dot(xk, wa, ax)
        # G(x) in fp32; only the experts' columns (1..N) are used below
        if SIGMOID:
            backbone = tl.sigmoid(tl.sum(tl.where((g == 0)[None, :], logits, 0.0), axis=1))
            expert_ok = (g >= 1)[None, :] & g_ok[None, :]
            masked = tl.where(expert_ok, logits, float("-inf"))
            e = tl.exp(masked - tl.max(masked, axis=1)[:, None])
            gates = (1.0 - backbone)[:, None] * e / tl.sum(e, axis=1)[:, None]
        else:
            masked = tl.where(g_ok[None, :], logits, float("-inf"))
            e = tl.exp(masked - tl.max(masked, axis=1)[:, None])
            gates = e / tl.sum(e, axis=1)[:, None]
        # spread expert i's gate (column 1 + i) over its r columns: a one-hot product, exact in ieee precision
        spread = tl.where((g[:, None] == (h // R + 1)[None, :]) & h_ok[None, :], 1.0, 0.0)
        mixed = ax * tl.dot(gates, spread, input_precision="ieee")
        ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        bt = tl.load(bt_ptr + h[:, None] * stride_bt + ds[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        delta = tl.dot(mixed.to(bt.dtype), bt)
        o_mask = (rows < M)[:, None] & d_ok[None, :]
        o_ptrs = out_ptr + rows[:, None] * stride_om + ds[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=o_mask)


def molora_add_(out: torch.Tensor, x: torch.Tensor, router_a: torch.Tensor, b_scaled_t: torch.Tensor,
                num_experts: int, r: int, gate: str = "softmax") -> torch.Tensor:
    """Add the MOLoRA delta of ``x`` (..., d_in) onto ``out`` (..., d_out) in place, in one kernel.

    ``router_a`` is W_r stacked over A ((N+1) + N*r rows or more: padding rows are not read), ``b_scaled_t``
    is (alpha/r) B transposed (N*r, d_out), as :class:`~citi_engine.molora.layer.FrozenMoloraLinear` keeps
    them. ``x`` and ``out`` must have contiguous rows; returns ``out``.
    """
    if not AVAILABLE:
        raise RuntimeError("molora_add_ needs Triton (it comes with CUDA builds of torch)")
    x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    m, k = x2.shape
    d = o2.shape[1]
    if x2.stride(1) != 1 or o2.stride(1) != 1 or router_a.stride(1) != 1 or b_scaled_t.stride(1) != 1:
        raise ValueError("molora_add_ needs tensors whose last dimension is contiguous")
    grid = (triton.cdiv(d, _BLOCK_D), triton.cdiv(m, _BLOCK_M))
    _molora_add_kernel[grid](
        x2, router_a, b_scaled_t, o2, m, k, d, x2.stride(0), router_a.stride(0), b_scaled_t.stride(0), o2.stride(0),
        N_EXPERTS=num_experts, R=r, SIGMOID=gate == "sigmoid",
        G_BLOCK=max(16, triton.next_power_of_2(num_experts + 1)), H_BLOCK=max(16, triton.next_power_of_2(num_experts * r)),
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
    return out
