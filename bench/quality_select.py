"""Pick each method's best configuration from a validation sweep (by tool accuracy) and print quality.py flags.

    python bench/quality_select.py SWEEP_DIR > plan.txt   # one line per method: "--method M <flags...>"
    python bench/quality.py --plan plan.txt --seed 0,1,2 --split test ...

The lines are a ``bench/quality.py --plan`` file; the base model's line pins ``--seed 0`` (nothing is trained,
so other seeds would repeat it).

Ties on tool accuracy go to the higher general retention. The choice and every swept value are written to
SWEEP_DIR/selection.json, so the merge step can say what was swept.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str]) -> int:
    sweep = Path(argv[0])
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*.json")) if p.name != "selection.json"]
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    selection = {}
    for method, rs in sorted(by_method.items()):
        best = max(rs, key=lambda r: (r["tool_accuracy"], r["general_retention"]))
        selection[method] = {
            "chosen": best["overrides"],
            "label": best["label"],
            "tried": [{"overrides": r["overrides"], "tool_accuracy": r["tool_accuracy"],
                       "general_retention": r["general_retention"]} for r in rs],
        }
        flags = " ".join(f"--{k.replace('_', '-')} {v!r}" if isinstance(v, int | float) else
                         f"--{k.replace('_', '-')} {v}" for k, v in best["overrides"].items())
        seed = " --seed 0" if method == "base" else ""
        print(f"--method {method} {flags}{seed}".replace("  ", " ").strip())
    (sweep / "selection.json").write_text(json.dumps(selection, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
