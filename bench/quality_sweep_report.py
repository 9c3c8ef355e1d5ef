"""Summarise a validation sweep of bench/quality.py (one seed) into bench/results/quality_sweep.{json,md,png}.

    python bench/quality_sweep_report.py bench/results/quality_raw/sweep_val [COMMIT]

COMMIT names the code that ran where the run files could not record it (the GPU copy has no .git).

Failed runs (no result file) are listed from the driver log so the table says what did not finish.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results"


def main(argv: list[str]) -> int:
    sweep = Path(argv[0])
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*_s*.json"))]
    log = (sweep / "driver.log").read_text() if (sweep / "driver.log").is_file() else ""
    failed = sorted(set(re.findall(r"FAILED (\S+) \(exit", log)))
    rows = []
    for r in sorted(runs, key=lambda r: (r["method"], r["label"])):
        rows.append({k: r.get(k) for k in ("label", "method", "overrides", "tool_accuracy", "irrelevance_accuracy",
                                           "parse_rate", "general_retention", "kl", "agreement",
                                           "humaneval_nll_delta", "per_category", "train_seconds", "steps",
                                           "stage_steps", "n_test", "n_probes")})
    card = " / ".join(sorted({r["card"] for r in runs})) or "?"
    commits = sorted({r.get("commit") or "?" for r in runs})
    selection = json.loads((sweep / "selection.json").read_text()) if (sweep / "selection.json").is_file() else {}
    chosen = {v["label"] for v in selection.values()}
    for row in rows:
        row["chosen"] = row["label"] in chosen
    plan_file = sweep / "sweep_plan.txt"
    plan = [ln for ln in plan_file.read_text().splitlines() if ln.strip()] if plan_file.is_file() else []
    summary = {"card": card, "model": runs[0]["model"] if runs else None, "split": "val", "seeds": [0],
               "commit": (argv[1] if len(argv) > 1 else None) or " / ".join(commits), "plan": plan,
               "selection": {m: v["label"] for m, v in selection.items()}, "runs": rows, "failed_runs": failed}
    (OUT / "quality_sweep.json").write_text(json.dumps(summary, indent=1))

    lines = [f"# Quality sweep on the validation split (one seed), {card}", "",
             f"Model: {summary['model']}. Commit: {summary['commit']}. Validation split: {rows[0]['n_test'] if rows else 0} "
             "BFCL cases whose functions appear in neither train nor test. Retention on "
             f"{rows[0]['n_probes'] if rows else 0} general probe prompts. Each method's chosen configuration "
             "(highest validation tool accuracy, ties to the higher retention) is in **bold**.", ""]
    if plan:
        lines += ["What was swept (`bench/quality.py --plan` lines; comma lists are crossed):", "", "```",
                  *plan, "```", ""]
    lines += [
             "| run | tool acc | irrelevance | parses as call | general_retention = exp(-KL) | KL | agreement | HumanEval NLL change | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        he = r["humaneval_nll_delta"]
        name = f"**{r['label']}**" if r["chosen"] else r["label"]
        lines.append(f"| {name} | {r['tool_accuracy']:.3f} | {r['irrelevance_accuracy']:.3f} | "
                     f"{(r['parse_rate'] or 0):.3f} | {r['general_retention']:.3f} | {r['kl']:.3f} | "
                     f"{r['agreement']:.3f} | {he:+.3f} | {(r['train_seconds'] or 0):.0f} |")
    lines += ["", "Per category:", "", "| run | " + " | ".join(sorted(rows[0]["per_category"])) + " |",
              "|---|" + "---|" * len(rows[0]["per_category"])]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['per_category'][c]:.2f}" for c in sorted(r["per_category"])) + " |")
    if failed:
        lines += ["", "Runs that failed (see their logs): " + ", ".join(failed) + "."]
    (OUT / "quality_sweep.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.scatter(r["general_retention"], r["tool_accuracy"], s=40)
        ax.annotate(r["label"], (r["general_retention"], r["tool_accuracy"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("general retention exp(-KL) (1 = unchanged)")
    ax.set_ylabel("tool-call accuracy (AST)")
    ax.set_title(f"Validation sweep, SmolLM2-135M, {card}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "quality_sweep.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
