"""``citi chat``: answer one prompt with an adapter (or a base model), printing the answer or the tool calls."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add ``chat`` to the ``citi`` parser."""
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
