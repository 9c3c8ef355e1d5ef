"""``citi export``: a plain Hugging Face model from an adapter directory (see :mod:`citi_engine.export`)."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--out", required=True, metavar="DIR", help="where the plain model goes")
    p.add_argument("--base", default=None, metavar="SPEC", help="base model (default: from citi_job.json)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="dtype of the exported weights")
    p.add_argument("--device", default="cpu", help="where to do the merge (default: cpu)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handle ``citi export``."""
    from citi_engine.errors import CitiError
    from citi_engine.export import export_model

    try:
        out = export_model(args.adapter, args.out, base=args.base, device=args.device, dtype=args.dtype)
    except CitiError as exc:
        print(f"citi export: {exc.message}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0
