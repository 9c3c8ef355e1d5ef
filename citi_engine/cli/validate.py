"""``citi validate``: check a training (or tool test) JSONL file as a job would, and list every problem."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from citi_engine.training.config import Hyperparameters


def register(subparsers) -> None:
    """Add ``validate`` to the ``citi`` parser."""
    p = subparsers.add_parser(
        "validate",
        help="check a training (or tool test) JSONL file and list every problem",
        description="Check a JSONL file as a job would, printing every problem as 'line N: CODE: message'. "
        "Exit code 0 when the file is fine, 2 when it has problems (or is missing), as for every problem "
        "the user can fix. With --model, also check lengths in tokens.",
    )
    p.add_argument("file", help="the JSONL file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--purpose", choices=("train", "test"), default="train",
                   help="train: training examples; test: tool test lines")
    p.add_argument("--min-examples", type=int, default=10, help="fewest examples a file may hold")
    p.add_argument("--model", default=None, help="also check every example fits --max-length with this tokenizer")
    p.add_argument("--max-length", type=int, default=Hyperparameters().max_length, help="longest example in tokens")
    p.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    """Handle ``citi validate``."""
    from citi_engine.data.validate import check_lengths, validate_jsonl
    from citi_engine.errors import CitiError

    path = Path(args.file)
    if not path.is_file():
        print(f"citi validate: no file at {path}", file=sys.stderr)
        return 2
    started = time.monotonic()
    report = validate_jsonl(path, min_examples=args.min_examples, purpose=args.purpose)
    problems = list(report.problems)
    if report.ok and args.model:
        try:
            from citi_engine.models import load_tokenizer
            from citi_engine.specs import resolve_model_spec

            tokenizer = load_tokenizer(resolve_model_spec(args.model))
        except CitiError as exc:
            print(f"citi validate: {exc.message}", file=sys.stderr)
            return 2
        problems += check_lengths(report.examples, tokenizer, args.max_length, lines=report.lines)
    if args.json:
        doc = report.to_dict()
        doc.update(ok=not problems, problems=[p.to_dict() for p in problems])
        print(json.dumps(doc, ensure_ascii=False))
    else:
        for problem in problems:
            print(str(problem))
        verdict = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"{path}: {verdict}: {report.n_examples} examples ({report.n_tool} tool, {report.n_general} general), "
              f"checked in {time.monotonic() - started:.1f}s", file=sys.stderr if problems else sys.stdout)
    return 0 if not problems else 2
