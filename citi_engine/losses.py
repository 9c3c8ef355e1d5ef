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

import contextlib
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


class _LinearKL(torch.autograd.Function):
    """Sum over rows of KL(softmax(t_hidden @ t_weight.T) || softmax(hidden @ weight.T)), gradients in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, chunk_size, need_hidden_grad, need_weight_grad):
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w, tw = weight.to(dtype), t_weight.to(dtype)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                log_p = torch.log_softmax((t_hidden[start : start + chunk_size].to(dtype) @ tw.T).to(acc), dim=-1)
                log_q = torch.log_softmax((h @ w.T).to(acc), dim=-1)
                p = log_p.exp()
                total += (p * (log_p - log_q)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d KL / d student logits = softmax(student) - teacher probabilities
                g = (log_q.exp_() - p).to(dtype)
                del log_p, log_q, p
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
        return gh, gw, None, None, None, None, None


def linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Summed KL(teacher || student) of the next-token distributions ``softmax(teacher_hidden @ teacher_weight.T)``
    and ``softmax(hidden @ weight.T)``, row by row, chunked like :func:`linear_cross_entropy` (no logits outlive
    their chunk). Only the student side (``hidden``, ``weight``) gets gradients."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    grad_on = torch.is_grad_enabled()
    return _LinearKL.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), int(chunk_size),
                           grad_on and hidden.requires_grad, grad_on and weight.requires_grad)


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


class Teacher:
    """The frozen base model that gives a step's soft targets (method issue: retention by soft targets).

    ``model`` is the model being trained: a peft model is its own teacher with every adapter switched off
    (:class:`citi_engine.adapter.AdaptersOff`), computed in the same step on the same inputs. ``frozen``, a
    separate untouched copy of the base, is the teacher of a full fine-tune, which has no adapters to switch off.
    """

    def __init__(self, model: nn.Module, frozen: nn.Module | None = None):
        if frozen is not None:
            self.base = frozen
            self.context: Any = contextlib.nullcontext
        else:
            from citi_engine.adapter import AdaptersOff

            self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.context = AdaptersOff(model)

    def hidden_at(self, batch: dict[str, Any], inputs: dict[str, Any], positions: torch.Tensor) -> torch.Tensor:
        """The teacher's last hidden states at the flat ``positions`` of ``batch`` (no grad). The decoder runs
        only on what holds such positions: those rows of a padded batch, those examples of a packed row (their
        segments gathered into a shorter packed row), so its cost follows the general examples alone."""
        if "cu_seq_lens_q" in inputs:
            sub_inputs, sub_positions = _packed_segments(inputs, positions)
        else:
            sub_inputs, sub_positions = _padded_rows(inputs, positions)
        with torch.no_grad(), self.context():
            hidden = self.base.get_decoder()(**sub_inputs).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, sub_positions)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.base.get_output_embeddings().weight


def _padded_rows(inputs: dict[str, Any], positions: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    rows_n, width = inputs["input_ids"].shape
    rows = torch.unique(positions // width)
    if rows.numel() == rows_n:
        return inputs, positions
    sub = {k: (v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in inputs.items()}
    return sub, torch.searchsorted(rows, positions // width) * width + positions % width


def _packed_segments(inputs: dict[str, Any], positions: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """A packed row of only the segments (examples) that hold ``positions``, and their positions in it."""
    cu = inputs["cu_seq_lens_q"].to(torch.long)
    segments = torch.unique(torch.searchsorted(cu[1:], positions, right=True))
    if segments.numel() == cu.numel() - 1:
        return inputs, positions
    starts, lengths = cu[segments], cu[segments + 1] - cu[segments]
    offsets = torch.cumsum(lengths, 0) - lengths  # where each kept segment starts in the new row
    total = int(lengths.sum())  # one host sync
    index = torch.arange(total, device=cu.device) + torch.repeat_interleave(starts - offsets, lengths,
                                                                            output_size=total)
    new_cu = torch.cat([cu.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)
    sub = dict(inputs)
    sub["input_ids"] = inputs["input_ids"].index_select(1, index)
    sub["position_ids"] = inputs["position_ids"].index_select(1, index)
    sub["cu_seq_lens_q"] = sub["cu_seq_lens_k"] = new_cu
    sub["max_length_q"] = sub["max_length_k"] = int(lengths.max())
    return sub, torch.searchsorted(index, positions)


def loss_positions_of(batch: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat positions whose next token is trained, their targets and their count (precomputed by the batchers,
    or found here at the cost of one host sync)."""
    if "loss_positions" in batch:
        positions = batch["loss_positions"].to(device, non_blocking=True)
        targets = batch["loss_targets"].to(device, non_blocking=True)
        return positions, targets, int(batch["num_label_tokens"])
    positions, targets = label_positions(batch["labels"].to(device))
    return positions, targets, int(positions.numel())


def answer_losses(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    teacher: Teacher | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The summed losses of one micro-batch's answer tokens: ``(ce_sum, kl_sum, positions, kinds)``.

    Without a ``teacher`` every labelled token gets cross-entropy (``kl_sum`` is 0). With one, the answer
    tokens of GENERAL examples (``batch["token_kind"]``) get KL(teacher || model) of the next-token
    distributions instead, and all others cross-entropy. ``positions`` are the flat positions whose next token
    is trained and ``kinds`` their examples' kinds (None when the batch carries no ``token_kind``).
    """
    from citi_engine.data.schemas import ExampleKind

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    inputs = model_inputs(batch, device)
    positions, targets, _ = loss_positions_of(batch, device)
    kinds = None
    if "token_kind" in batch:
        kinds = batch["token_kind"].to(device, non_blocking=True).reshape(-1).index_select(0, positions)
    head = base.get_output_embeddings()
    weight = _plain_linear_weight(head)
    if weight is None:
        raise ValueError("answer_losses needs a plain linear output head; use causal_lm_loss for other heads")
    hidden = base.get_decoder()(**inputs).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    zero = flat.new_zeros((), dtype=torch.float32)
    if teacher is None or kinds is None:
        ce = linear_cross_entropy(flat.index_select(0, positions), weight, targets, chunk_size=chunk_size)
        return ce, zero, positions, kinds
    general = kinds == int(ExampleKind.GENERAL)
    kl_idx = general.nonzero().reshape(-1)  # one host sync per micro-batch
    ce_idx = (~general).nonzero().reshape(-1)
    ce = linear_cross_entropy(flat.index_select(0, positions[ce_idx]), weight, targets[ce_idx],
                              chunk_size=chunk_size) if ce_idx.numel() else zero
    kl = zero
    if kl_idx.numel():
        kl_positions = positions[kl_idx]
        t_hidden = teacher.hidden_at(batch, inputs, kl_positions)
        kl = linear_kl(flat.index_select(0, kl_positions), weight, t_hidden, teacher.head_weight,
                       chunk_size=chunk_size)
    return ce, kl, positions, kinds


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
