"""Pick each method's best configuration from a validation sweep (by tool accuracy) and print quality.py flags.

    python bench/quality_select.py [--rule=tool|retention-band|retention-floor] SWEEP_DIR > plan.txt   # "--method M <flags...>"
    python bench/quality.py --plan plan.txt --seed 0,1,2 --split test ...

The lines are a ``bench/quality.py --plan`` file; the base model's line pins ``--seed 0`` (nothing is trained,
so other seeds would repeat it).

Rule ``tool`` (default): the highest tool accuracy. Rule ``retention-band``: the highest tool accuracy among the
runs within RETENTION_BAND of the method's best headline retention. Rule ``retention-floor``: the highest tool
accuracy among the runs whose headline retention reaches RETENTION_FLOOR (the method issue's target); if none
does, the band rule. Ties go to the higher retention. The choice and every swept value are written to
SWEEP_DIR/selection.json, so the merge step can say what was swept.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

# --rule retention-band: the product's promise is both numbers at once, so a configuration is first required to
# keep within this much of the best headline retention (the lower of retention without and with tools offered)
# any configuration of its method reached; among those, the highest tool accuracy wins.
RETENTION_BAND = 0.02
# --rule retention-floor: the product's target itself (headline retention >= 0.95, KL <= 0.05) as the bar. Unlike
# the band, one configuration that buys retention with accuracy (e.g. four times the replay) does not raise the bar
# for all the others.
RETENTION_FLOOR = 0.95


def _retention(r: dict) -> float:
    return r.get("headline_retention", r["general_retention"])


def choose(rs: list[dict], rule: str) -> dict:
    """The chosen run of one method's sweep under ``rule`` (``tool``, ``retention-band`` or ``retention-floor``)."""
    if rule == "retention-floor":
        kept = [r for r in rs if _retention(r) >= RETENTION_FLOOR]
        if kept:
            return max(kept, key=lambda r: (r["tool_accuracy"], _retention(r)))
        rule = "retention-band"
    if rule == "retention-band":
        best_kept = max(_retention(r) for r in rs)
        rs = [r for r in rs if _retention(r) >= best_kept - RETENTION_BAND]
    return max(rs, key=lambda r: (r["tool_accuracy"], _retention(r)))


def main(argv: list[str]) -> int:
    rule = "tool"
    if argv and argv[0].startswith("--rule="):
        rule = argv.pop(0).split("=", 1)[1]
    if rule not in ("tool", "retention-band", "retention-floor"):
        raise SystemExit("--rule must be tool, retention-band or retention-floor")
    sweep = Path(argv[0])
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*.json")) if p.name != "selection.json"]
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    selection = {"rule": rule, "retention_band": RETENTION_BAND if rule == "retention-band" else None,
                 "retention_floor": RETENTION_FLOOR if rule == "retention-floor" else None}
    for method, rs in sorted(by_method.items()):
        best = choose(rs, rule)
        selection[method] = {
            "chosen": best["overrides"],
            "label": best["label"],
            "tried": [{"overrides": r["overrides"], "tool_accuracy": r["tool_accuracy"],
                       "irrelevance_accuracy": r.get("irrelevance_accuracy"),
                       "general_retention": r["general_retention"], "headline_retention": _retention(r)}
                      for r in rs],
        }
        flags = " ".join(f"--{k.replace('_', '-')} {v!r}" if isinstance(v, int | float) else
                         f"--{k.replace('_', '-')} {v}" for k, v in best["overrides"].items())
        seed = " --seed 0" if method == "base" else ""
        print(f"--method {method} {flags}{seed}".replace("  ", " ").strip())
    (sweep / "selection.json").write_text(json.dumps(selection, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
