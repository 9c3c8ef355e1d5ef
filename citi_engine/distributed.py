"""Data-parallel training on all GPUs of one host (DDP), started with ``torchrun``.

``torchrun --standalone --nproc_per_node=<gpus> <script>`` starts one process per GPU and sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init_distributed` reads them (and is a no-op
for a plain single process). Each process keeps a full copy of the model, trains on its own share
of the micro-batches (:func:`shard`) and DDP averages the gradients of the trained parameters
during backward. Only rank 0 writes files (:func:`is_main`, :func:`write_on_main`).

Wrap the *loss computation* (:class:`LossModule`), not the bare model: DDP prepares its gradient
reduction in its own ``forward``, and our loss runs the decoder and the output head separately
(:func:`citi_engine.losses.causal_lm_loss`), so the whole loss must run inside that forward. DDP
looks at which parameters require grad when it is built: wrap again after
:func:`citi_engine.adapter.set_trainable` switches stages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, its GPU on this host, and how many processes run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; start the job with torchrun") from exc


def init_distributed(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` set up; return this process's :class:`DistInfo`.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) nothing is initialised and the device
    is ``device`` or ``cuda`` when visible. On GPUs the backend is NCCL, each process on GPU
    ``LOCAL_RANK``; ``NCCL_NVLS_ENABLE`` defaults to 0 (NVLink SHARP multicast needs fabric
    support that shared hosts often lack, and a failed multicast setup hangs the first collective).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return DistInfo(device=device)
    import torch.distributed as dist

    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise RuntimeError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                "start torchrun with --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if device.startswith("cuda") else "gloo"))
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device)


def is_main(info: DistInfo | None = None) -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and logs."""
    if info is not None:
        return info.rank == 0
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(info: DistInfo) -> None:
    """Wait for every process (a no-op in a single process)."""
    if info.enabled:
        import torch.distributed as dist

        if info.device.startswith("cuda"):
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (call once at the end of a distributed run)."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(items: Sequence[T], info: DistInfo, *, equal: bool = True) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th item from ``rank``.

    With ``equal`` the tail is dropped so every process gets the same number of items: DDP
    processes must run the same number of steps, or the one with an extra step waits forever
    for the others in its gradient reduction.
    """
    n = len(items)
    if equal:
        n -= n % info.world_size
    if info.enabled and n == 0:
        raise ValueError(f"{len(items)} items cannot be shared by {info.world_size} processes: give more data")
    return [items[i] for i in range(info.rank, n, info.world_size)]


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``value`` over all processes (a copy; the input unchanged)."""
    out = value.clone()
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The maximum of ``value`` over all processes (a copy)."""
    out = value.clone()
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


class LossModule(nn.Module):
    """``forward(batch) -> loss``: ``loss_fn(model, batch)`` as a module, so DDP can wrap the whole loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def wrap_ddp(module: nn.Module, info: DistInfo, **kwargs: Any) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes run; ``module`` itself otherwise.

    Defaults: gradients as views of the reduction buckets (no extra copy), no buffer broadcast
    (Llama's buffers are rotary tables, identical on every rank), every trained parameter used
    in every step.
    """
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    options: dict[str, Any] = {"gradient_as_bucket_view": True, "broadcast_buffers": False}
    if info.device.startswith("cuda"):
        options["device_ids"] = [info.local_rank]
        options["output_device"] = info.local_rank
    options.update(kwargs)
    return DistributedDataParallel(module, **options)


def write_on_main(path: str | os.PathLike, data: Any, info: DistInfo | None = None) -> Path | None:
    """Write ``data`` as JSON (or text, for a str) to ``path`` on rank 0 only; return the path there."""
    if not is_main(info):
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path
