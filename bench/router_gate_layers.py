"""Where in the model a router switches its experts off: the backbone gate by layer depth, from quality runs.

    python bench/router_gate_layers.py bench/results/quality_raw/method_h100/router_val/val_*_s0.json

Each ``bench/quality.py`` record of a CITI run keeps the mean backbone gate G(x)[0] of every MOLoRA component on
the tokens of the general probes (without and with unrelated tools offered) and on the tokens that write the test
calls. The method issue's target is the mean over components (>= 0.8 on general tokens); this splits it by depth
(the model's layers in thirds) and counts the components that reach 0.8 alone, so a setting that moves some
layers and not others shows which.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

KINDS = ("general", "general_with_tools", "tool_call")


def depth_of(component: str) -> int:
    match = re.search(r"layers\.(\d+)\.", component)
    if match is None:
        raise ValueError(f"no layer index in component name {component!r}")
    return int(match.group(1))


def summarise(record: dict, parts: int = 3) -> dict:
    """Mean gate per depth part for each kind of token, and the share of components at 0.8 or more."""
    router = record["router"]
    layers = {kind: router[kind]["per_layer"] for kind in KINDS}
    depth = {name: depth_of(name) for name in layers["general"]}
    n_layers = max(depth.values()) + 1
    part_of = {name: min(parts - 1, d * parts // n_layers) for name, d in depth.items()}
    out = {"run": record.get("run_id") or record.get("label"), "components": len(depth)}
    for kind in KINDS:
        by_part = [[v for name, v in layers[kind].items() if part_of[name] == p] for p in range(parts)]
        out[kind] = {"mean": router[kind]["mean"], "by_depth": [statistics.fmean(v) if v else None for v in by_part]}
    out["general_at_0.8"] = sum(v >= 0.8 for v in layers["general"].values()) / len(depth)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench/quality.py result files of CITI runs")
    p.add_argument("--parts", type=int, default=3, help="depth parts (default: thirds)")
    p.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    args = p.parse_args(argv)
    rows = [summarise(json.loads(path.read_text()), args.parts) for path in args.runs]
    head = " / ".join(f"part {i + 1}" for i in range(args.parts))
    print(f"| run | gate general ({head}) | with tools ({head}) | tool call ({head}) | components >= 0.8 |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [" / ".join(f"{v:.2f}" for v in row[kind]["by_depth"]) for kind in KINDS]
        print(f"| {row['run']} | {cells[0]} | {cells[1]} | {cells[2]} | {row['general_at_0.8']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
