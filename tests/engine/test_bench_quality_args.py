"""bench/quality.py runs each configuration in a process of its own: that process must get every option the
pool was given (an option left out of the child's command line silently changes what a GPU run measures)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402


def _value(action):
    if action.const is not None and action.nargs == 0:
        return action.const  # store_true flags
    if action.choices:
        return list(action.choices)[-1]
    if action.type in (int, float):
        return action.type(7)
    return "x,y" if action.dest in ("method", "seed") else f"v-{action.dest}"


def test_every_option_of_the_pool_reaches_each_runs_own_process():
    parser = quality.build_parser()
    pool_only = {"help", "method", "seed", "plan", "label", "jobs", "gpus", "deadline", "stagger", "oom_retries",
                 "in_order", "missing", "model", "set"}
    sweep = set(quality.SWEEP)
    argv = ["--gguf", "model.gguf", "--method", "citi", "--seed", "3", "--set", "hyperparameters.seed_x=1"]
    for action in parser._actions:
        if action.dest in pool_only | sweep | {"gguf"} or not action.option_strings:
            continue
        value = _value(action)
        argv += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    args = parser.parse_args(argv)
    run = quality.expand(args)[0]
    child = parser.parse_args(quality.child_argv(args, run)[2:])
    for action in parser._actions:
        if action.dest in pool_only | sweep or not action.option_strings:
            continue
        assert getattr(child, action.dest) == getattr(args, action.dest), f"--{action.dest} is lost in the child"
    assert child.set == args.set and (child.method, child.seed) == ("citi", "3")
