"""``citi importance``: score component importance and draw the heat map, without training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from citi_engine import DEFAULT_MODEL
from citi_engine.cli.progress import DefaultsFormatter, add_output_flags, run_with_progress
from citi_engine.training.config import ComponentsConfig, FinetuneConfig, Hyperparameters


def register(subparsers) -> None:
    """Add ``importance`` to the ``citi`` parser."""
    p = subparsers.add_parser(
        "importance",
        help="score component importance and draw the heat map (no training)",
        description="Score every component's tool and general importance on the data, choose the MOLoRA and "
        "UCO components as finetune would, and write importance.json and importance.png to --out.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model spec")
    p.add_argument("--data", required=True, metavar="FILE", help="training data JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="where importance.json and importance.png go")
    p.add_argument("--general-file", metavar="FILE", default=None, help="general examples (default: replay)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu")
    hp, comp = Hyperparameters(), ComponentsConfig()
    p.add_argument("--importance-examples", type=int, default=hp.importance_examples, help="examples per set")
    p.add_argument("--batch-size", type=int, default=hp.batch_size, help="scoring batch size")
    p.add_argument("--max-length", type=int, default=hp.max_length, help="longest example in tokens")
    p.add_argument("--replay-examples", type=int, default=hp.replay_examples,
                   help="replay examples built when the data has no general examples")
    p.add_argument("--replay-max-new-tokens", type=int, default=hp.replay_max_new_tokens,
                   help="longest replay answer in tokens")
    p.add_argument("--molora-fraction", type=float, default=comp.molora_fraction, help="MOLoRA share of components")
    p.add_argument("--uco-fraction", type=float, default=comp.uco_fraction, help="UCO share of components")
    add_output_flags(p)
    p.set_defaults(func=run_importance_command)


def run_importance_command(args: argparse.Namespace) -> int:
    """Handle ``citi importance``."""
    try:
        cfg = FinetuneConfig(
            model=args.model, training_file=args.data, out_dir=args.out, general_file=args.general_file,
            seed=args.seed, device=args.device, test_fraction=0.0,
            components={"molora_fraction": args.molora_fraction, "uco_fraction": args.uco_fraction},
            hyperparameters={"importance_examples": args.importance_examples, "batch_size": args.batch_size,
                             "max_length": args.max_length, "replay_examples": args.replay_examples,
                             "replay_max_new_tokens": args.replay_max_new_tokens},
        )
    except ValueError as exc:
        print(f"citi importance: {exc}", file=sys.stderr)
        return 2
    from citi_engine.train import run_importance

    result = run_with_progress("importance", args, lambda on_event: run_importance(cfg, on_event=on_event))
    if isinstance(result, int):
        return result
    top = sorted(result.components, key=lambda n: -result.M[n])[:5]
    print(f"importance: {Path(args.out) / 'importance.json'}, heat map: {Path(args.out) / 'importance.png'}")
    print(f"MOLoRA ({len(result.molora)}): " + ", ".join(result.molora))
    print(f"UCO ({len(result.uco)}): " + ", ".join(result.uco))
    print("top tool importance: " + ", ".join(f"{n} {result.M[n]:.4f}" for n in top))
    return 0
