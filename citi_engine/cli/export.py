"""``citi export``: a plain Hugging Face model from an adapter directory (see :mod:`citi_engine.export`)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``export`` command to the ``citi`` parser."""
    p = subparsers.add_parser(
        "export",
        help="export a plain Hugging Face model (UCO merged, MOLoRA dropped; LoRA merged)",
        description="Write a plain Hugging Face model directory that loads without citi or peft. For a citi "
        "adapter, the UCO components' trained weights are merged and the MOLoRA experts are DROPPED: they are "
        "routed per token and cannot be merged into fixed weights, so most of the tool-calling gain is lost. "
        "Serve the adapter itself (citi chat --adapter DIR) to keep it. A lora adapter is merged exactly; a "
        "full fine-tune is copied.",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory written by citi finetune")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where the plain model goes: a new or empty folder (see --force)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it exists and is not empty (its old contents are removed once "
                   "the export has succeeded)")
    p.add_argument("--base", default=None, metavar="SPEC", help="base model (default: from citi_job.json)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="dtype of the exported weights")
    p.add_argument("--device", default="cpu", help="where to do the merge (default: cpu)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handle ``citi export``."""
    from citi_engine.errors import CitiError
    from citi_engine.export import export_model

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"citi export: --out {out} is a file, not a folder; choose another path", file=sys.stderr)
        return 2
    adapter = Path(args.adapter).resolve()
    if out.resolve() == adapter or out.resolve() in adapter.parents:
        print(f"citi export: --out {out} holds the adapter itself; choose another folder", file=sys.stderr)
        return 2
    replacing = out.is_dir() and any(out.iterdir())
    if replacing and not args.force:
        print(f"citi export: --out {out} exists and is not empty; choose a new folder or pass --force to replace "
              "it", file=sys.stderr)
        return 2
    # Written beside --out and swapped in at the end, so a failed export leaves the old folder as it was and
    # a replaced one keeps none of its old files (stale weight shards would load as part of the model).
    staging = out.with_name(f".{out.name}.citi-export") if replacing else out
    if replacing:
        shutil.rmtree(staging, ignore_errors=True)  # left by an earlier export that was killed
    try:
        export_model(args.adapter, staging, base=args.base, device=args.device, dtype=args.dtype)
    except (CitiError, OSError) as exc:
        if replacing:
            shutil.rmtree(staging, ignore_errors=True)
        message = exc.message if isinstance(exc, CitiError) else f"cannot write {out}: {exc.strerror or exc}"
        print(f"citi export: {message}", file=sys.stderr)
        return 2
    if replacing:
        shutil.rmtree(out)
        staging.rename(out)
    print(f"exported to {out}" + (" (replaced what was there)" if replacing else ""))
    return 0
