"""The ``citi`` command: one argparse parser, one module per command (``progress`` holds what the training
commands share).

    citi finetune   --model SPEC --data FILE --out DIR [--method citi|lora|full] [budget, hyperparameters]
    citi importance --model SPEC --data FILE --out DIR
    citi chat       --adapter DIR | --model SPEC  [--tools FILE] "prompt"
    citi validate   FILE [--json]
    citi export     --adapter DIR --out DIR [--force]
    citi eval       ...  (citi_engine/cli/eval.py)
    citi submit | jobs | status | watch | download | cancel | delete | files ...
                         (citi_engine/cli/client.py, the service client, when installed)

Each module exposes ``register(subparsers)`` and imports torch only inside its handlers, so
``citi --help`` stays fast. Handlers return the exit code: 0 done, 2 a problem the user can fix
(bad data, budget, arguments), 1 an unexpected failure, 130 interrupted or cancelled.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from citi_engine import __version__

# Command modules, in help order. The first ones ship with the engine; the others are optional
# (written separately) and must not break the CLI when absent or broken.
CORE_MODULES = ("finetune", "importance", "chat", "validate", "export")
OPTIONAL_MODULES = ("eval", "client")


def build_parser() -> argparse.ArgumentParser:
    """The ``citi`` parser with every available command registered."""
    parser = argparse.ArgumentParser(
        prog="citi",
        description="Fine-tune chat models to call tools without forgetting the rest (CITI: importance-guided "
        "MOLoRA + UCO), evaluate them, chat with them.",
    )
    parser.add_argument("--version", action="version", version=f"citi {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in CORE_MODULES:
        importlib.import_module(f"citi_engine.cli.{name}").register(subparsers)
    for name in OPTIONAL_MODULES:
        module_name = f"citi_engine.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not installed in this build
            _warn_unavailable(name, exc)
            continue
        except Exception as exc:  # a broken optional module must not take the other commands down
            _warn_unavailable(name, exc)
            continue
        try:
            module.register(subparsers)
        except Exception as exc:
            _warn_unavailable(name, exc)
    return parser


def _warn_unavailable(name: str, exc: BaseException) -> None:
    print(f"citi: the '{name}' commands are unavailable ({exc.__class__.__name__}: {exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``citi`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("citi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
