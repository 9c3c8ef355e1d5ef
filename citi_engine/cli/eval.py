"""``citi eval``: evaluate an adapter on a tool test set and on general retention, write its report.

    citi eval --adapter DIR --tool-test FILE [--base SPEC] [--limit N] [--batch-size N] [--constrained]

The report (``report.json``, ``report.md``, plots) goes next to the adapter unless ``--out`` says
otherwise; the headline numbers are printed as a table.
"""

from __future__ import annotations

import argparse
import sys

from citi_engine import DECODE_MODES


def register(subparsers) -> None:
    """Add the ``eval`` command to the ``citi`` parser's subcommands."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate an adapter: tool-call accuracy and general retention",
        description="Evaluate an adapter on a tool test set (AST-judged tool calls) and on general retention "
        "(KL to the base model on probe prompts, HumanEval NLL); write report.json, report.md and plots.",
    )
    p.add_argument("--adapter", required=True, help="adapter directory written by a fine-tuning job")
    p.add_argument("--tool-test", required=True,
                   help="tool test file: our JSONL (see docs/CONTRACTS.md, 'Tool test format') or a BFCL "
                        "question file (BFCL_v4_<category>.json)")
    p.add_argument("--tool-answers", default=None,
                   help="BFCL answer file for a BFCL question file (default: possible_answer/<same name> next "
                        "to it)")
    p.add_argument("--base", default=None, help="base model spec (default: the one in the adapter's citi_job.json)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N test cases (spread over categories)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--probe-limit", type=int, default=None, help="use at most N general probe prompts")
    p.add_argument("--constrained", action="store_true",
                   help="also evaluate with every call held to the offered tools and their parameter schemas "
                        "(constrained decoding, as the inference server does for forced calls); reported as "
                        "tool_accuracy_constrained beside tool_accuracy")
    p.add_argument("--call-threshold", type=float, default=None,
                   help="also evaluate the tool cases as served with this call threshold (default: the one the job "
                        "chose, the adapter's calibration.json, when above 0; 0: greedy decoding only)")
    p.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="KV cache of the decode loop (default auto: CUDA graphs on a GPU, else the dynamic cache, as a "
                        "job's own evaluation and the inference server decode)")
    p.add_argument("--no-retention", action="store_true", help="skip the general-retention measurement")
    p.add_argument("--no-humaneval", action="store_true", help="skip the HumanEval NLL")
    p.add_argument("--humaneval-limit", type=int, default=None, help="use at most N HumanEval problems")
    p.add_argument("--pass-at-1", action="store_true",
                   help="also run HumanEval pass@1 (executes generated code in a separate, time-limited process)")
    p.add_argument("--separate-base", action="store_true",
                   help="load the base model separately instead of switching a peft adapter off")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when visible)")
    p.add_argument("--out", default=None, help="where to write the report (default: the adapter directory)")
    p.set_defaults(func=run_eval)


def _check_positive(args: argparse.Namespace) -> str | None:
    for name in ("limit", "batch_size", "max_new_tokens", "probe_limit", "humaneval_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    if args.call_threshold is not None and not 0 <= args.call_threshold <= 100:
        return f"--call-threshold must be between 0 and 100 (logits), got {args.call_threshold}"
    return None


def print_summary(report: dict, console=None) -> None:
    """Print the report's headline numbers and per-category accuracy as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = report["summary"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x):
        return "n/a" if x is None else f"{x:.4f}"

    table = Table(title="Evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("tool-call accuracy", f"{pct(s['tool_accuracy'])} of {s['n_test']}")
    table.add_row("irrelevance accuracy", pct(s["irrelevance_accuracy"]))
    table.add_row("parse rate (cases expecting calls)", pct(s["parse_rate"]))
    if s.get("tool_accuracy_constrained") is not None:
        table.add_row("tool-call accuracy, constrained to schemas", pct(s["tool_accuracy_constrained"]))
        table.add_row("irrelevance accuracy, constrained", pct(s.get("irrelevance_accuracy_constrained")))
    if s.get("tool_accuracy_at_threshold") is not None:
        t = report["tool_at_threshold"]["call_threshold"]
        table.add_row(f"tool-call accuracy at call threshold {t:g}", pct(s["tool_accuracy_at_threshold"]))
        table.add_row(f"irrelevance accuracy at call threshold {t:g}", pct(s.get("irrelevance_accuracy_at_threshold")))
    table.add_row("general retention exp(-KL)", num(s["general_retention"]))
    table.add_row("KL(base || tuned) per token", num(s["kl"]))
    table.add_row("agreement with base", pct(s["agreement"]))
    table.add_row("HumanEval NLL change", num(s["humaneval_nll_delta"]))
    console.print(table)
    tool = report.get("tool")
    if tool:
        cats = Table(title="Tool-call accuracy by category")
        for col in ("category", "cases", "correct", "accuracy"):
            cats.add_column(col, justify="left" if col == "category" else "right")
        for cat, c in tool["per_category"].items():
            cats.add_row(cat, str(c["n"]), str(c["correct"]), pct(c["accuracy"]))
        console.print(cats)
        if tool["failure_counts"]:
            fails = Table(title="Failures by reason")
            fails.add_column("reason")
            fails.add_column("count", justify="right")
            for reason, n in tool["failure_counts"].items():
                fails.add_row(reason, str(n))
            console.print(fails)


def run_eval(args: argparse.Namespace) -> int:
    """Handle ``citi eval``; returns the exit code (2 for a problem the user can fix)."""
    from citi_engine.errors import CitiError
    from citi_engine.evaluate import evaluate_adapter, load_tool_cases

    problem = _check_positive(args)
    if problem:
        print(f"citi eval: {problem}", file=sys.stderr)
        return 2
    try:
        # Read the test set before loading any model, so a bad file fails in a second.
        cases = load_tool_cases(args.tool_test, args.tool_answers, limit=args.limit)
    except CitiError as exc:
        print(f"citi eval: {exc.message}", file=sys.stderr)
        return 2

    from citi_engine.adapter import load_adapter, read_call_threshold, read_job
    from citi_engine.models import load_model

    job = read_job(args.adapter)
    threshold = read_call_threshold(args.adapter) if args.call_threshold is None else args.call_threshold
    try:
        model, tokenizer = load_adapter(args.adapter, base=args.base, device=args.device)
        base_spec = args.base or job.get("base_model")
        base_model = None
        is_peft = hasattr(model, "disable_adapter")
        if not args.no_retention and (args.separate_base or not is_peft):
            base_model, _ = load_model(base_spec, device=args.device)
    except CitiError as exc:
        print(f"citi eval: {exc.message}", file=sys.stderr)
        return 2

    report = evaluate_adapter(
        model, tokenizer, base_model, cases, [] if args.no_retention else None, args.out or args.adapter,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, probe_limit=args.probe_limit,
        humaneval=not args.no_humaneval, humaneval_limit=args.humaneval_limit, pass_at_1=args.pass_at_1,
        constrained=args.constrained, call_threshold=threshold, decode=args.decode,
        metadata={"model": base_spec, "method": job.get("method"), "adapter": str(args.adapter),
                  "tool_test": str(args.tool_test)},
    )
    print_summary(report)
    print(f"report written to {args.out or args.adapter}/report.md")
    return 0
