"""Cross-entropy on the labelled tokens only, without the full fp32 logits.

A causal LM's head turns every position's hidden state into ``vocab`` logits: for 4,096 tokens
and Llama-3's 128,256-token vocabulary that is 2 GiB in fp32, plus as much again for its
gradient, and most positions carry no label (prompts, tool schemas). Here the head is applied only
to the positions whose next token is trained, a chunk of tokens at a time, and the gradient of
each chunk is computed right away (``softmax - onehot``), so no logits outlive their chunk and the
backward pass needs no recomputation. The value and the gradients equal
``F.cross_entropy(hidden @ weight.T, targets)`` (tested against it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from citi_engine.packing import IGNORE_INDEX, model_inputs

DEFAULT_CHUNK = 1024


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross-entropy(hidden @ weight.T, targets), gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, need_hidden_grad, need_weight_grad):
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)  # fp32 softmax and sums; fp64 stays fp64 (reference checks)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                t = targets[start : start + chunk_size]
                logits = (h @ w.T).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d(sum CE)/d logits = softmax - onehot, built in place in the chunk's logits buffer
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -1.0))
                g = probs.to(dtype)
                del logits, probs
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = (g @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g.T @ h).to(acc)
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.has[0] else None
        gw = (grad_weight * grad_total).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, chunked (``hidden`` (N, d), ``weight`` (V, d)).

    Every row of ``targets`` must be a real class (select the labelled rows first). The
    matmuls run in the autocast dtype when autocast is on, else in ``hidden``'s dtype; the
    softmax and the sums are fp32. ``reduction`` is ``sum`` (divide by your own token count: no
    host sync) or ``mean``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    grad_on = torch.is_grad_enabled()
    total = _LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        int(chunk_size),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    if reduction == "mean":
        return total / max(int(targets.shape[0]), 1)
    return total


def _head_sum_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed CE through an arbitrary head module (peft-wrapped, biased), one checkpointed chunk at a time."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(h, t))
    return total


def _plain_linear_weight(head: nn.Module) -> torch.Tensor | None:
    # Only a plain bias-free nn.Linear may be replaced by its weight: a peft wrapper around the
    # head (LoRA on lm_head, modules_to_save) has a forward of its own that must run.
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    return None


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions whose next label is trained, and those labels (one host sync; batchers precompute it)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = shifted.reshape(-1)
    positions = (flat != IGNORE_INDEX).nonzero().reshape(-1)
    return positions, flat[positions]


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "mean",
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on the labelled tokens of ``batch`` and their count.

    ``model`` is a causal LM (a peft model or a plain transformers one); ``batch`` a packed or
    padded batch from :mod:`citi_engine.packing` (or the contract's batch dict, in which case the
    labelled positions are found here, at the cost of one host sync). Only the decoder runs
    over all tokens; the output head runs on the labelled positions only, through
    :func:`linear_cross_entropy`. Models whose head is more than a matmul (logit soft-capping,
    logit scaling) go through their own forward. ``mean`` divides by the number of labelled
    tokens (a plain int, so no sync).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    device = next(base.parameters()).device
    inputs = model_inputs(batch, device)
    if "loss_positions" in batch:
        positions = batch["loss_positions"].to(device, non_blocking=True)
        targets = batch["loss_targets"].to(device, non_blocking=True)
        count = int(batch["num_label_tokens"])
    else:
        positions, targets = label_positions(batch["labels"].to(device))
        count = int(positions.numel())

    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        out = model(**inputs, labels=batch["labels"].to(device, non_blocking=True))
        return (out.loss if reduction == "mean" else out.loss * count), count

    hidden = base.get_decoder()(**inputs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    head = base.get_output_embeddings()
    weight = _plain_linear_weight(head)
    if weight is not None:
        total = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, reduction="sum")
    else:
        total = _head_sum_ce(head, hidden, targets, chunk_size)
    if reduction == "sum":
        return total, count
    return total / max(count, 1), count


def training_loss(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    routing_beta: float = 0.0,
    routing_delta: float = 0.95,
    chunk_size: int = DEFAULT_CHUNK,
    label_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss of one micro-batch: ``(total, cross_entropy, routing_loss or None)``, all on the device.

    ``total = cross_entropy + routing_beta * routing_loss`` where the routing loss
    (:func:`citi_engine.adapter.routing_loss`) is added when ``routing_beta > 0``; it sums the router
    weights per example over ``sequence_mask`` for packed rows and over ``attention_mask`` for
    padded batches. The cross-entropy is summed over the labelled tokens and divided by
    ``label_tokens``: by default this micro-batch's own count; with gradient accumulation pass
    the count of the whole step, so every answer token weighs the same whichever micro-batch
    it lands in. Nothing here reads a value back to the host, so a training loop that logs only
    every few steps never waits for the GPU.
    """
    ce_sum, count = causal_lm_loss(model, batch, chunk_size=chunk_size, reduction="sum")
    ce = ce_sum / max(int(label_tokens if label_tokens is not None else count), 1)
    if routing_beta <= 0:
        return ce, ce, None
    from citi_engine.adapter import routing_loss

    device = ce.device
    mask = batch["sequence_mask"] if "sequence_mask" in batch else batch["attention_mask"]
    rl = routing_loss(model, batch["task_type"].to(device, non_blocking=True), mask.to(device, non_blocking=True),
                      routing_delta)
    return ce + routing_beta * rl, ce, rl
