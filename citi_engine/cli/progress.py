"""What the training commands share: their help formatter, their output flags, and running a job with
progress bars (or JSON event lines) that maps the engine's errors to messages and exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

TRAINING_STAGES = ("router_pretraining", "molora", "uco", "train")


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows a flag's default, unless it has none worth showing or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """``--json-events`` and ``--quiet``."""
    p.add_argument("--json-events", action="store_true",
                   help="print every progress event as one JSON line instead of progress bars")
    p.add_argument("--quiet", action="store_true", help="print only the result")


def run_with_progress(command: str, args: argparse.Namespace, call):
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
