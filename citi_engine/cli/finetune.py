"""``citi finetune``: fine-tune a model for tool calling (citi, lora or full).

Every budget, component and hyperparameter field of :class:`~citi_engine.train.FinetuneConfig`
becomes a flag (``lr_molora`` -> ``--lr-molora``) with the field's own help text, so the command line
and the library never disagree. Torch is imported inside the handler only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from citi_engine import DEFAULT_MODEL
from citi_engine.cli.progress import DefaultsFormatter, add_output_flags, run_with_progress
from citi_engine.training.config import METHODS, Budget, ComponentsConfig, FinetuneConfig, Hyperparameters

# (config attribute, dataclass, argparse group title) of the nested config sections.
SECTIONS = (
    ("budget", Budget, "budget (the run stops at the first cap reached)"),
    ("components", ComponentsConfig, "components and adapter sizes"),
    ("hyperparameters", Hyperparameters, "hyperparameters"),
)


def register(subparsers) -> None:
    """Add ``finetune`` to the ``citi`` parser."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model for tool calling (citi, lora or full)",
        description="Fine-tune a chat model on tool-calling data. method citi: component importance, then "
        "router pre-training, MOLoRA improvement and UCO stages; lora and full are the paper's baselines. "
        "Rerunning the same command with the same --out resumes from the last checkpoint.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: built-in name, local HF dir or .gguf, hub id")
    p.add_argument("--data", required=True, metavar="FILE", help="training data, OpenAI chat fine-tuning JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the adapter and checkpoints")
    p.add_argument("--method", choices=METHODS, default="citi", help="fine-tuning method")
    p.add_argument("--validation-file", metavar="FILE", default=None,
                   help="held-out tool test set (JSONL); without it, --test-fraction of the tool examples is held out")
    p.add_argument("--general-file", metavar="FILE", default=None,
                   help="general (non-tool) examples to mix in; without any, citi builds replay data")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, splits and initialisation")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="fraction of tool examples held out for testing when no --validation-file (0: none)")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="checkpoint every N steps besides stage boundaries (0: boundaries only)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when visible)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                   help="dtype of the frozen model (default: bf16 on GPU, fp32 on CPU); trained weights stay fp32")
    _add_section_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run_finetune)


def _add_section_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of the budget, components and hyperparameters dataclasses, help from metadata."""
    import dataclasses

    for section, cls, title in SECTIONS:
        group = p.add_argument_group(title)
        defaults = cls()
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = getattr(defaults, f.name)
            help_text = f.metadata.get("help", "").replace("%", "%%")
            if default is not None:
                help_text += f" (default: {default})"
            type_name = str(f.type)
            dest = f"{section}:{f.name}"
            if "bool" in type_name:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                kind = int if type_name.startswith("int") else float
                group.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS,
                                   metavar="N" if kind is int else "X", help=help_text)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` that ``citi finetune``'s arguments describe (raises ValueError)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name, _, _ in SECTIONS}
    for key, value in vars(args).items():
        if ":" in key and value is not None:
            section, name = key.split(":", 1)
            sections[section][name] = value
    return FinetuneConfig(
        model=args.model, training_file=args.data, out_dir=args.out, method=args.method,
        validation_file=args.validation_file, general_file=args.general_file, seed=args.seed,
        test_fraction=args.test_fraction, checkpoint_every=args.checkpoint_every, device=args.device,
        dtype=args.dtype, **sections,
    )


def run_finetune(args: argparse.Namespace) -> int:
    """Handle ``citi finetune``."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"citi finetune: {exc}", file=sys.stderr)
        return 2
    from citi_engine.train import finetune

    def call(on_event):
        return finetune(cfg, on_event=on_event)

    result = run_with_progress("finetune", args, call)
    if isinstance(result, int):
        return result
    print(f"adapter: {result.adapter_dir}")
    stages = ", ".join(f"{name} {n}" for name, n in result.stage_steps.items())
    print(f"steps: {result.steps} ({stages}); tokens: {result.trained_tokens:,}")
    if result.selected_components.get("molora"):
        print(f"components: {len(result.selected_components['molora'])} MOLoRA, {len(result.selected_components['uco'])} UCO "
              f"(see {Path(result.adapter_dir) / 'importance.png'})")
    if result.report_path:
        _print_report_summary(result.report_path)
    print(f'try it: citi chat --adapter {result.adapter_dir} "your prompt" --tools tools.json')
    return 0


def _print_report_summary(report_path: str) -> None:
    try:
        summary = json.loads(Path(report_path).read_text()).get("summary") or {}
    except (OSError, json.JSONDecodeError):
        return
    parts = []
    if summary.get("tool_accuracy") is not None:
        parts.append(f"tool accuracy {summary['tool_accuracy']:.3f} on {summary.get('n_test', 0)} tests")
    if summary.get("general_retention") is not None:
        parts.append(f"general retention {summary['general_retention']:.3f} (KL {summary['kl']:.4f})")
    if parts:
        print("evaluation: " + ", ".join(parts) + f" (report: {report_path})")
