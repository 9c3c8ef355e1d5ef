"""Micro-batches of about N real tokens: sequence packing, and a padding batcher for comparison.

Packing concatenates several encoded examples into one row of ``1 x T`` tokens. Nothing may leak
between the examples sharing a row:

- ``position_ids`` restart at 0 at the start of every example, so each one sees the positions it
  would see alone;
- the first token of every example carries label -100, so the last token of one example is never
  trained to predict the first token of the next;
- attention stays inside each example. With ``attn_implementation="sdpa"`` and no ``attention_mask``,
  transformers (5.x, ``masking_utils.find_packed_sequence_indices``) reads the restarts in
  ``position_ids`` and builds a block-diagonal causal mask; this needs ``use_cache=False``, because
  the detection is skipped whenever a cache is present. The mask is a dense ``T x T`` mask, so SDPA
  cannot use its flash kernel and computes every block of the row. The optional ``citi_varlen``
  attention (:func:`enable_varlen_attention`) instead hands the example boundaries
  (``cu_seq_lens``) to a variable-length flash kernel, which computes only the blocks inside each
  example.

A packed batch is a dict of tensors: ``input_ids``, ``labels``, ``position_ids`` (1, T) long,
``task_type`` (S,) (one per example in the row), ``token_kind`` (1, T) (each token's example kind,
-1 on padding), ``sequence_mask`` (S, T) bool (the tokens of each
example; the packed counterpart of a padded batch's ``attention_mask`` when a quantity is summed per
example), ``cu_seq_lens`` (S'+1,) int32 (example boundaries, the padding tail as its own segment),
plus plain ints ``max_seq_len``, ``num_tokens`` (real tokens) and ``num_label_tokens``, and
``loss_positions``/``loss_targets`` (see :func:`citi_engine.losses.causal_lm_loss`). It has no
``attention_mask``: passing one would switch transformers' packed-sequence detection off.
:func:`model_inputs` picks what the model's forward takes. (That detection reads one value back
from the GPU per forward; it is transformers' own and the only host sync of a packed step.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
VARLEN_ATTENTION = "citi_varlen"

Example = dict[str, Any]  # {"input_ids": list[int], "labels": list[int], "task_type": int}


def example_kind(example: Example) -> int:
    """An encoded example's :class:`~citi_engine.data.schemas.ExampleKind`, from its task type when it has none."""
    return int(example.get("kind", example.get("task_type", 1)))


def _check_example(example: Example, index: int, max_tokens: int) -> int:
    ids, labels = example["input_ids"], example["labels"]
    if len(ids) != len(labels):
        raise ValueError(f"example {index}: input_ids and labels differ in length ({len(ids)} vs {len(labels)})")
    if not ids:
        raise ValueError(f"example {index} is empty")
    if len(ids) > max_tokens:
        raise ValueError(
            f"example {index} has {len(ids)} tokens, more than the {max_tokens} tokens of one micro-batch: "
            "raise max_tokens or lower max_length so every example fits"
        )
    return len(ids)


def _loss_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions whose *next* label is trained, and those labels (computed once, on the host)."""
    flat = labels.reshape(-1)
    row = labels.shape[-1]
    nxt = torch.full_like(flat, IGNORE_INDEX)
    nxt[:-1] = flat[1:]
    # The last token of a row predicts nothing (the next row is another batch item).
    nxt.view(-1, row)[:, -1] = IGNORE_INDEX
    positions = (nxt != IGNORE_INDEX).nonzero().reshape(-1)
    return positions, nxt[positions]


def plan_packing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_tokens`` tokens (first-fit decreasing).

    First-fit decreasing fills rows to well over 90% for lengths much shorter than a row; the
    rows are returned in a deterministic order (by their first index), each row's examples in
    input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max_tokens - lengths[i])
    rows = [sorted(r) for r in rows]
    rows.sort(key=lambda r: r[0])
    return rows


def collate_packed(
    examples: Sequence[Example],
    *,
    pad_id: int,
    row_length: int | None = None,
    pad_to_multiple_of: int = 64,
) -> dict[str, Any]:
    """Pack ``examples`` into one ``1 x T`` row (see the module docstring for the keys).

    ``row_length`` fixes T (static shapes: torch.compile and CUDA graphs see one shape); otherwise
    T is the total length rounded up to ``pad_to_multiple_of``. The padding tail is its own
    segment (positions restart, labels -100), so no real token attends to it.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    total = sum(lengths)
    if row_length is None:
        row_length = int(math.ceil(total / pad_to_multiple_of) * pad_to_multiple_of)
    if total > row_length:
        raise ValueError(f"{total} tokens do not fit a row of {row_length}")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    kinds: list[int] = []
    for e in examples:
        ids.extend(e["input_ids"])
        kinds.extend([example_kind(e)] * len(e["input_ids"]))
        lab = list(e["labels"])
        lab[0] = IGNORE_INDEX  # no target across an example boundary
        labels.extend(lab)
        positions.extend(range(len(e["input_ids"])))
    tail = row_length - total
    segments = list(lengths)
    if tail:
        ids.extend([pad_id] * tail)
        labels.extend([IGNORE_INDEX] * tail)
        positions.extend(range(tail))
        kinds.extend([-1] * tail)
        segments.append(tail)
    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    sequence_mask = torch.zeros(len(examples), row_length, dtype=torch.bool)
    for s in range(len(examples)):
        sequence_mask[s, cu[s] : cu[s + 1]] = True
    labels_t = torch.tensor([labels], dtype=torch.long)
    loss_positions, loss_targets = _loss_targets(labels_t)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": labels_t,
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "task_type": torch.tensor([int(e.get("task_type", 1)) for e in examples], dtype=torch.long),
        "token_kind": torch.tensor([kinds], dtype=torch.long),
        "sequence_mask": sequence_mask,
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "max_seq_len": max(segments),
        "num_tokens": total,
        "num_label_tokens": int(loss_positions.numel()),
        "loss_positions": loss_positions,
        "loss_targets": loss_targets,
    }


def pack_examples(
    examples: Sequence[Example],
    *,
    max_tokens: int = 4096,
    pad_id: int = 0,
    fixed_length: bool = True,
    pad_to_multiple_of: int = 64,
    shuffle_seed: int | None = None,
) -> list[dict[str, Any]]:
    """Pack ``examples`` into micro-batches of one row of at most ``max_tokens`` tokens each.

    With ``fixed_length`` every row is exactly ``max_tokens`` long (the tail padded), else it is
    rounded up to ``pad_to_multiple_of``. ``shuffle_seed`` shuffles the order of the rows
    (first-fit decreasing otherwise leaves rows of long examples first).
    """
    lengths = [_check_example(e, i, max_tokens) for i, e in enumerate(examples)]
    rows = plan_packing(lengths, max_tokens)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return [
        collate_packed(
            [examples[i] for i in row],
            pad_id=pad_id,
            row_length=max_tokens if fixed_length else None,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        for row in rows
    ]


def collate_padded(examples: Sequence[Example], *, pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, Any]:
    """A right-padded ``B x L`` batch (the contract's batch dict), L the longest example rounded up."""
    longest = max(len(e["input_ids"]) for e in examples)
    width = int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    kinds = torch.full((len(examples), width), -1, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[b, :n] = 1
        kinds[b, :n] = example_kind(e)
    loss_positions, loss_targets = _loss_targets(labels)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "task_type": torch.tensor([int(e.get("task_type", 1)) for e in examples], dtype=torch.long),
        "token_kind": kinds,
        "num_tokens": int(mask.sum()),
        "num_label_tokens": int(loss_positions.numel()),
        "loss_positions": loss_positions,
        "loss_targets": loss_targets,
    }


def pad_batches(
    examples: Sequence[Example],
    *,
    max_tokens: int = 4096,
    pad_id: int = 0,
    pad_to_multiple_of: int = 8,
) -> list[dict[str, Any]]:
    """Plain padded micro-batches with the same budget of real tokens as :func:`pack_examples`.

    Examples are taken in the order given (no sorting by length, as most training scripts do);
    a batch closes when the next example would take it over ``max_tokens`` real tokens, and is
    padded to its longest example. The padding is the cost that packing removes.
    """
    lengths = [_check_example(e, i, max_tokens) for i, e in enumerate(examples)]
    batches: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if batches[-1] and used + n > max_tokens:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += n
    return [
        collate_padded([examples[i] for i in b], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of) for b in batches
    ]


def model_inputs(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """The keyword arguments for the model's forward, moved to ``device`` without a host sync.

    Packed batches give ``position_ids`` and the example boundaries (read by the ``citi_varlen``
    attention, ignored by the others) and no ``attention_mask``; padded batches give the mask.
    ``use_cache=False`` always: with a cache, transformers does not look for packed sequences.
    """

    def move(t: torch.Tensor) -> torch.Tensor:
        return t if device is None else t.to(device, non_blocking=True)

    kwargs: dict[str, Any] = {"input_ids": move(batch["input_ids"]), "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = move(batch["position_ids"])
        kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = move(batch["cu_seq_lens"])
        kwargs["max_length_q"] = kwargs["max_length_k"] = int(batch["max_seq_len"])
    else:
        kwargs["attention_mask"] = move(batch["attention_mask"])
    return kwargs


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Every tensor of ``batch`` on ``device`` (pinned copies, non-blocking on CUDA); ints unchanged."""
    out: dict[str, Any] = {}
    cuda = str(device).startswith("cuda")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if cuda and not value.is_cuda:
                value = value.pin_memory()
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def padding_fraction(batches: Iterable[dict[str, Any]]) -> float:
    """Share of the computed token slots that are padding (0 for perfectly full batches)."""
    slots = real = 0
    for b in batches:
        slots += b["input_ids"].numel()
        real += b["num_tokens"]
    return 1.0 - real / slots if slots else 0.0


# ----------------------------------------------------------------------------------------------
# Variable-length attention: attention computed only inside each packed example.


def reference_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, max_seq_len: int, scale: float
) -> torch.Tensor:
    """Causal attention per segment with SDPA, one segment at a time (the definition; slow).

    ``q`` is (total, H, D) and ``k``/``v`` (total, H_kv, D). Used on CPU and to check the fast
    kernel on the GPU before trusting it.
    """
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def _torch_varlen_kernel():
    """``torch.nn.attention.varlen.varlen_attn`` adapted to one calling convention, or None.

    Its keywords changed between releases (torch 2.10: ``is_causal``; later: ``window_size`` and
    ``enable_gqa``), so the signature is read rather than assumed.
    """
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    has_scale = "scale" in params
    has_gqa = "enable_gqa" in params

    def kernel(q, k, v, cu_seq_lens, max_seq_len, scale):
        groups = q.shape[1] // k.shape[1]
        extra = dict(causal)
        if groups > 1:
            if has_gqa:
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
        if has_scale:
            extra["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise ValueError("this torch's varlen_attn has no scale argument; the model needs a non-default one")
        return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_seq_len, max_seq_len, **extra)

    return kernel


_KERNEL: dict[str, Any] = {"fn": None, "name": None}


def _segments_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Example boundaries read from restarting ``position_ids`` (1, T) (a host sync; fallback only)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``citi_varlen`` attention function for transformers' ``AttentionInterface``.

    Packed rows (``cu_seq_lens_q`` given, or restarting ``position_ids`` and no mask) go to the
    variable-length kernel; anything else (padded batches with a mask, decoding with a cache)
    goes to transformers' own SDPA path unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None and attention_mask is None and key.shape[2] == length and length > 1 and batch == 1:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            cu, max_len = _segments_from_positions(position_ids)
    if cu is None or _KERNEL["fn"] is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    scale = scaling if scaling is not None else dim**-0.5
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[-1])
    kernel = _KERNEL["fn"]
    if _KERNEL["name"] == "torch_varlen" and query.dtype not in (torch.float16, torch.bfloat16):
        kernel = reference_varlen_attention  # flash kernels take 16-bit inputs only (an fp32 run without autocast)
    out = kernel(q, k, v, cu, int(max_len), scale)
    return out.reshape(batch, length, heads, value.shape[-1]), None


def _varlen_mask(*args: Any, **kwargs: Any):
    """Mask builder for ``citi_varlen``: no dense mask for unpadded/packed rows, SDPA's otherwise."""
    import inspect

    from transformers.masking_utils import sdpa_mask

    bound = inspect.signature(sdpa_mask).bind_partial(*args, **kwargs).arguments
    if bound.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def _check_kernel(kernel, device: torch.device) -> str | None:
    """Compare ``kernel`` with the per-segment reference, values and gradients; None when it agrees."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = [37, 128, 5, 200, 1]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    dtype = torch.bfloat16

    def make(h):
        return torch.randn(total, h, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    grad = torch.randn(total, heads, dim, generator=gen).to(device=device, dtype=dtype)
    try:
        out = kernel(q, k, v, cu, max(lengths), dim**-0.5)
        out.backward(grad)
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this kernel"
        return f"{type(exc).__name__}: {exc}"
    got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    q.grad = k.grad = v.grad = None
    ref = reference_varlen_attention(q.float(), k.float(), v.float(), cu, max(lengths), dim**-0.5)
    ref.backward(grad.float())
    want = [ref.detach(), q.grad.float(), k.grad.float(), v.grad.float()]
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        err = (a - b).abs().max().item()
        if not err <= 0.05 * (b.abs().max().item() + 1e-3):
            return f"{name} differs from the reference by {err:.3g}"
    return None


def enable_varlen_attention(model: torch.nn.Module, *, allow_reference: bool = False) -> str:
    """Switch ``model`` to the ``citi_varlen`` attention when a checked variable-length kernel exists.

    On CUDA the torch flash kernel is checked against the per-segment reference (values and
    gradients) first. ``allow_reference`` uses the slow reference where no fast kernel passes (for
    tests on CPU). Returns the attention implementation in use afterwards: ``citi_varlen:<kernel>``,
    or the unchanged one (``sdpa`` normally) with the reason in ``model.citi_varlen_skipped``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    reason = None
    kernel, name = None, None
    if device.type == "cuda":
        kernel = _torch_varlen_kernel()
        if kernel is None:
            reason = "torch has no usable torch.nn.attention.varlen.varlen_attn"
        else:
            reason = _check_kernel(kernel, device)
            name = "torch_varlen" if reason is None else None
            if reason is not None:
                kernel = None
    else:
        reason = f"no fast variable-length kernel on {device.type}"
    if kernel is None and allow_reference:
        kernel, name, reason = reference_varlen_attention, "reference", None
    if kernel is None:
        base.citi_varlen_skipped = reason
        return str(base.config._attn_implementation)
    _KERNEL.update(fn=kernel, name=name)
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    previous = str(base.config._attn_implementation)
    try:
        base.set_attn_implementation(VARLEN_ATTENTION)
    except (AttributeError, ValueError, TypeError) as exc:
        base.citi_varlen_skipped = f"transformers refused the attention implementation: {exc}"
        return previous
    if base.config._attn_implementation != VARLEN_ATTENTION:
        base.citi_varlen_skipped = "transformers did not switch the attention implementation"
        return str(base.config._attn_implementation)
    return f"{VARLEN_ATTENTION}:{name}"
