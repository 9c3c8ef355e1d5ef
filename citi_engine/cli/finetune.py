"""Commands that train and use models: ``citi finetune``, ``citi importance``, ``citi chat``, ``citi validate``.

Every budget, component and hyperparameter field of :class:`~citi_engine.train.FinetuneConfig`
becomes a flag of ``citi finetune`` (``lr_molora`` -> ``--lr-molora``) with the field's own help
text, so the command line and the library never disagree. Torch is imported inside the handlers only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from citi_engine import DEFAULT_MODEL
from citi_engine.training.config import METHODS, Budget, ComponentsConfig, FinetuneConfig, Hyperparameters

# (config attribute, dataclass, argparse group title) of the nested config sections.
SECTIONS = (
    ("budget", Budget, "budget (the run stops at the first cap reached)"),
    ("components", ComponentsConfig, "components and adapter sizes"),
    ("hyperparameters", Hyperparameters, "hyperparameters"),
)
TRAINING_STAGES = ("router_pretraining", "molora", "uco", "train")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows a flag's default, unless it has none worth showing or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def register(subparsers) -> None:
    """Add ``finetune``, ``importance``, ``chat`` and ``validate`` to the ``citi`` parser."""
    _register_finetune(subparsers)
    _register_importance(subparsers)
    _register_chat(subparsers)
    _register_validate(subparsers)


# ------------------------------------------------------------------------------------------ finetune


def _register_finetune(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model for tool calling (citi, lora or full)",
        description="Fine-tune a chat model on tool-calling data. method citi: component importance, then "
        "router pre-training, MOLoRA improvement and UCO stages; lora and full are the paper's baselines. "
        "Rerunning the same command with the same --out resumes from the last checkpoint.",
        formatter_class=_DefaultsFormatter,
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
    _add_output_flags(p)
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


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json-events", action="store_true",
                   help="print every progress event as one JSON line instead of progress bars")
    p.add_argument("--quiet", action="store_true", help="print only the result")


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

    result = _run_job("finetune", args, call)
    if isinstance(result, int):
        return result
    print(f"adapter: {result.adapter_dir}")
    stages = ", ".join(f"{name} {n}" for name, n in result.stage_steps.items())
    print(f"steps: {result.steps} ({stages}); tokens: {result.trained_tokens:,}")
    if result.components.get("molora"):
        print(f"components: {len(result.components['molora'])} MOLoRA, {len(result.components['uco'])} UCO "
              f"(see {Path(result.adapter_dir) / 'importance.png'})")
    if result.report_path:
        _print_report_summary(result.report_path)
    print(f'try it: citi chat --adapter {result.adapter_dir} "your prompt" --tools tools.json')
    return 0


def _run_job(command: str, args: argparse.Namespace, call):
    """Run ``call(on_event)`` with progress output; map the engine's errors to messages and exit codes."""
    from citi_engine.errors import BudgetError, Cancelled, CitiError, DataValidationError

    try:
        with _progress_printer(args) as on_event:
            return call(on_event)
    except DataValidationError as exc:
        print(f"citi {command}: {exc.param or 'file'} is not valid ({len(exc.problems)} problem(s)):",
              file=sys.stderr)
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        if not exc.problems:
            print(exc.message, file=sys.stderr)
        return 2
    except BudgetError as exc:
        print(f"citi {command}: {exc.message}", file=sys.stderr)
        return 2
    except Cancelled as exc:
        print(f"citi {command}: {exc.message}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"citi {command}: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except CitiError as exc:
        print(f"citi {command}: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:  # impossible settings found once the model is known (e.g. too few components)
        print(f"citi {command}: {exc}", file=sys.stderr)
        return 2


class _EventPrinter:
    """Turns engine events into rich progress bars (one per phase; the training stages share one).

    Without a terminal (a log file, CI) bars are replaced by a plain line every tenth of a phase.
    """

    def __init__(self, quiet: bool = False):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
            disable=quiet or not self.live,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _EventPrinter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        kind, stage = event.get("type"), event.get("stage", "")
        message = event.get("message") or ""
        if kind == "progress":
            self._progress(stage, event)
        elif kind == "stage":
            self.progress.console.print(f"[bold cyan]{stage}[/]" if message.endswith("started") else f"  {message}")
        elif message:
            self.progress.console.print(f"  {message}")

    def _progress(self, stage: str, event: dict) -> None:
        info = []
        if event.get("loss") is not None:
            info.append(f"loss {event['loss']:.4f}")
        if event.get("routing_loss") is not None:
            info.append(f"routing {event['routing_loss']:.3f}")
        if event.get("lr") is not None:
            info.append(f"lr {event['lr']:.2e}")
        if event.get("tokens_per_s"):
            info.append(f"{event['tokens_per_s']:,.0f} tok/s")
        step, total = event.get("step", 0), event.get("total_steps") or None
        if not self.live:
            if total and (step == total or step % max(1, total // 10) == 0):
                self.console.print(f"  {stage} {step}/{total} " + "  ".join(info))
            return
        key = "training" if stage in TRAINING_STAGES else stage
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(stage, total=total, info="")
        self.progress.update(self.tasks[key], completed=step, total=total, description=stage, info="  ".join(info))


class _JsonEvents:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __call__(self, event: dict) -> None:
        print(json.dumps(event, default=str), flush=True)


def _progress_printer(args: argparse.Namespace):
    if getattr(args, "json_events", False):
        return _JsonEvents()
    return _EventPrinter(quiet=getattr(args, "quiet", False))


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


# ---------------------------------------------------------------------------------------- importance


def _register_importance(subparsers) -> None:
    p = subparsers.add_parser(
        "importance",
        help="score component importance and draw the heat map (no training)",
        description="Score every component's tool and general importance on the data, choose the MOLoRA and "
        "UCO components as finetune would, and write importance.json and importance.png to --out.",
        formatter_class=_DefaultsFormatter,
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
    _add_output_flags(p)
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

    result = _run_job("importance", args, lambda on_event: run_importance(cfg, on_event=on_event))
    if isinstance(result, int):
        return result
    top = sorted(result.components, key=lambda n: -result.M[n])[:5]
    print(f"importance: {Path(args.out) / 'importance.json'}, heat map: {Path(args.out) / 'importance.png'}")
    print(f"MOLoRA ({len(result.molora)}): " + ", ".join(result.molora))
    print(f"UCO ({len(result.uco)}): " + ", ".join(result.uco))
    print("top tool importance: " + ", ".join(f"{n} {result.M[n]:.4f}" for n in top))
    return 0


# ---------------------------------------------------------------------------------------------- chat


def _register_chat(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="answer one prompt with an adapter (or a base model), printing the answer or the tool calls",
        description="Load an adapter directory (or, with --model, a base model) and answer one prompt. Tool "
        "calls are printed one JSON object a line: {\"name\": ..., \"arguments\": {...}}.",
    )
    p.add_argument("prompt", help="the user message")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", metavar="DIR", help="adapter directory written by citi finetune")
    source.add_argument("--model", metavar="SPEC", help="a base model spec, to chat without an adapter")
    p.add_argument("--base", metavar="SPEC", default=None,
                   help="base model for --adapter (default: the one recorded in its citi_job.json)")
    p.add_argument("--tools", metavar="FILE", default=None,
                   help="JSON file with the tools offered: a list of OpenAI tool objects, or {\"tools\": [...]}")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu")
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    p.set_defaults(func=run_chat)


def read_tools(path: str) -> list[dict]:
    """Tools from a JSON file: a list of tools, ``{"tools": [...]}``, or one tool (OpenAI shape or bare function)."""
    from citi_engine.data.schemas import normalize_tool

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the tools file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"the tools file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ValueError(f"the tools file {path} must hold a JSON list of tool objects like "
                         '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
    return [normalize_tool(t) for t in data]


def run_chat(args: argparse.Namespace) -> int:
    """Handle ``citi chat``."""
    from citi_engine.errors import CitiError

    try:
        tools = read_tools(args.tools) if args.tools else []
    except ValueError as exc:
        print(f"citi chat: {exc}", file=sys.stderr)
        return 2
    from citi_engine.generate import generate_chat

    try:
        if args.adapter:
            from citi_engine.adapter import load_adapter

            model, tokenizer = load_adapter(args.adapter, base=args.base, device=args.device)
        else:
            from citi_engine.models import load_model

            model, tokenizer = load_model(args.model, device=args.device)
    except CitiError as exc:
        print(f"citi chat: {exc.message}", file=sys.stderr)
        return 2
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    reply = generate_chat(model, tokenizer, [{"messages": messages, "tools": tools}],
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)[0]
    if args.json:
        print(json.dumps(reply.to_dict(), ensure_ascii=False))
        return 0
    if reply.content:
        print(reply.content)
    for call in reply.tool_calls:
        fn = call.get("function", {})
        arguments = fn.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass
        print(json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False))
    return 0


# ------------------------------------------------------------------------------------------ validate


def _register_validate(subparsers) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a training (or tool test) JSONL file and list every problem",
        description="Check a JSONL file as a job would, printing every problem as 'line N: CODE: message'. "
        "Exit code 0 when the file is fine, 1 when it has problems. With --model, also check lengths in tokens.",
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
    return 0 if not problems else 1
