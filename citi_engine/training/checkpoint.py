"""Checkpoints: enough state that a resumed run ends with the same adapter as an uninterrupted one.

One checkpoint is one directory under ``out_dir/checkpoints/``:

- ``meta.json``: position (stage index, step within the stage, global step), tokens trained,
  seconds spent, the stage plan, the chosen components, the config that made it;
- ``trainable.safetensors``: every tensor that any stage trains (routers, experts, UCO copies, or
  LoRA / all weights for the baselines), by parameter name;
- ``optimizer.pt``: optimizer and LR scheduler state (mid-stage checkpoints only; a stage boundary
  starts the next stage with a fresh optimizer), loadable with ``weights_only=True``;
- ``rng.pt``: torch (and CUDA) and Python RNG states;
- ``importance.json`` and ``replay.jsonl`` (citi), so a resume skips scoring and replay.

Writes go to a temporary directory first and are renamed into place, so a crash never leaves a
half-written checkpoint that looks complete. Stage boundaries are kept; of the periodic
checkpoints only the newest is.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
META = "meta.json"


@dataclass
class Checkpoint:
    """A checkpoint on disk and its ``meta.json``."""

    path: Path
    meta: dict[str, Any]

    @property
    def position(self) -> tuple[int, int]:
        return int(self.meta["stage_index"]), int(self.meta["stage_step"])

    @property
    def is_boundary(self) -> bool:
        return self.meta.get("kind") == "boundary"

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "trainable.safetensors"), device=str(device))

    def optimizer_state(self) -> dict[str, Any] | None:
        f = self.path / "optimizer.pt"
        return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None

    def restore_rng(self) -> None:
        state = torch.load(self.path / "rng.pt", map_location="cpu", weights_only=True)
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(_python_state_from_list(state["python"]))

    def read_json(self, name: str) -> Any:
        f = self.path / name
        return json.loads(f.read_text()) if f.is_file() else None

    def read_jsonl(self, name: str) -> list[dict] | None:
        f = self.path / name
        if not f.is_file():
            return None
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def checkpoint_name(meta: dict[str, Any]) -> str:
    if meta["kind"] == "boundary":
        return f"stage-{meta['stage_index']}-start"
    return f"step-{meta['global_step']:08d}"


def save_checkpoint(
    root: str | os.PathLike,
    *,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None = None,
    json_files: dict[str, Any] | None = None,
    jsonl_files: dict[str, list[dict]] | None = None,
) -> Path:
    """Write one checkpoint atomically under ``root`` and prune older periodic ones.

    ``meta`` must hold ``kind`` ("boundary" or "periodic"), ``stage_index``, ``stage_step`` and
    ``global_step``; a boundary checkpoint is the start of stage ``stage_index``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "created": time.time(), **meta}
    name = checkpoint_name(meta)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": _python_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    for fname, obj in (json_files or {}).items():
        (tmp / fname).write_text(json.dumps(obj, indent=1))
    for fname, rows in (jsonl_files or {}).items():
        (tmp / fname).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    # meta.json last: a directory without it is never taken for a checkpoint.
    (tmp / META).write_text(json.dumps(meta, indent=1))
    final = root / name
    if final.exists():  # a resumed run reaching the same position again
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _prune(root, keep=final)
    return final


def _prune(root: Path, keep: Path) -> None:
    """Delete periodic checkpoints other than ``keep``, and leftovers of interrupted writes."""
    for child in root.iterdir():
        if child == keep:
            continue
        if child.name.startswith((".tmp-", ".old-")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith("step-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def list_checkpoints(root: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints under ``root``, oldest position first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        meta_file = child / META
        if child.name.startswith(".") or not meta_file.is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("format") == FORMAT:
            found.append(Checkpoint(child, meta))
    return sorted(found, key=lambda c: c.position)


def latest_checkpoint(root: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint furthest into training, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None
