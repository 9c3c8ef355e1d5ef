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

Every process must make the same decisions at the same moments, or one waits forever in a
collective the others never join. The trainer keeps them in step with a few helpers here: work done
on rank 0 alone and its result (or its exception) shared (:func:`run_on_main`), flags that stop
every process when any one raises them (:func:`any_rank`), and values every process agrees on
(:func:`max_over_ranks`, :func:`sum_over_ranks`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from citi_engine.files import write_json_atomic, write_text_atomic

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


def init_distributed(backend: str | None = None, device: str | None = None,
                     timeout_s: float | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` set up; return this process's :class:`DistInfo`.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) nothing is initialised and the device
    is ``device`` or ``cuda`` when visible. On GPUs the backend is NCCL, each process on GPU
    ``LOCAL_RANK``; ``NCCL_NVLS_ENABLE`` defaults to 0 (NVLink SHARP multicast needs fabric
    support that shared hosts often lack, and a failed multicast setup hangs the first collective).
    ``device="cpu"`` runs CPU processes over gloo (tests). ``timeout_s`` is how long a collective
    may wait for the slowest process (torch's default when None).
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
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend=backend or ("nccl" if device.startswith("cuda") else "gloo"), timeout=timeout)
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device)


def is_initialized() -> bool:
    """True when this process is already in a process group (its caller set one up)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


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


def _flags_tensor(values: Sequence[float], info: DistInfo) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)


def any_rank(flags: Sequence[bool], info: DistInfo) -> list[bool]:
    """Each flag, true on every process when it is true on any one (one collective for all of them)."""
    if not info.enabled:
        return [bool(f) for f in flags]
    return [v > 0 for v in all_reduce_max(_flags_tensor(flags, info), info).tolist()]


def max_over_ranks(values: Sequence[float], info: DistInfo) -> list[float]:
    """Each value's maximum over all processes: one number every process agrees on (e.g. elapsed time)."""
    if not info.enabled:
        return [float(v) for v in values]
    return all_reduce_max(_flags_tensor(values, info), info).tolist()


def sum_over_ranks(values: Sequence[float], info: DistInfo) -> list[float]:
    """Each value summed over all processes (e.g. the parts of one step's loss)."""
    if not info.enabled:
        return [float(v) for v in values]
    return all_reduce_sum(_flags_tensor(values, info), info).tolist()


def broadcast_tensors(tensors: Iterable[torch.Tensor], info: DistInfo) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (every process passes them in the same order)."""
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _shareable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that carries its type and message."""
    # An exception pickles as its type and args (BaseException.__reduce__), and comes back through
    # type(exc)(*args) on the other side: rebuild it that way here, so one that cannot be rebuilt is
    # sent as a plain copy instead of failing on the receiving process.
    try:
        pickle.dumps(exc)
        type(exc)(*exc.args)
        return exc
    except Exception:  # noqa: BLE001 - any problem means "send a plain copy"
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def run_on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on rank 0 only and return its result on every process.

    An exception raised by ``fn`` (a cancel included) is raised on every process, so none waits
    for a result that never comes. The result must be picklable. Without several processes this
    is just ``fn()``.
    """
    if not info.enabled:
        return fn()
    import torch.distributed as dist

    payload: list[Any] = [None]
    error: BaseException | None = None
    if info.rank == 0:
        try:
            payload[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - shared with the other processes, then raised here too
            error = exc
            payload[0] = ("error", _shareable(exc))
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if error is not None:
        raise error
    if kind == "error":
        raise value
    return value


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names and exact bytes of ``tensors`` (sorted by name): equal only for equal weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LossModule(nn.Module):
    """``forward(batch, **kw) -> loss``: ``loss_fn(model, batch, **kw)`` as a module, so DDP can wrap the whole loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any], **kwargs: Any) -> Any:
        return self.loss_fn(self.model, batch, **kwargs)


def wrap_ddp(module: nn.Module, info: DistInfo, **kwargs: Any) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes run; ``module`` itself otherwise.

    Defaults: gradients as views of the reduction buckets (no extra copy), no buffer broadcast
    (Llama's buffers are rotary tables, identical on every rank), every trained parameter used
    in every step.
    """
    if not info.enabled:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync in forward: torch 2.13 renamed the switch (the old name still works, with a warning).
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    options: dict[str, Any] = {"gradient_as_bucket_view": True, no_buffer_sync: False}
    if info.device.startswith("cuda"):
        options["device_ids"] = [info.local_rank]
        options["output_device"] = info.local_rank
    options.update(kwargs)
    return DistributedDataParallel(module, **options)


def write_on_main(path: str | os.PathLike, data: Any, info: DistInfo | None = None) -> Path | None:
    """Write ``data`` as JSON (or text, for a str) to ``path`` on rank 0 only; return the path there."""
    if not is_main(info):
        return None
    return write_text_atomic(path, data) if isinstance(data, str) else write_json_atomic(path, data)
