"""Merge quality run files (bench/quality.py) into bench/results/quality.{json,md,png}.

    python bench/quality_merge.py RUN_DIR [RUN_DIR ...] [--out bench/results] [--bootstrap 10000]
    # the chosen configuration of each method from a sweep, keyed by method, as quality_val.*:
    python bench/quality_merge.py SWEEP_DIR --labels base,lora_lr0.001,... --by-method --prefix quality_val

Runs are grouped by label (the method, or the name given with ``--label``). For each label: means
over seeds and the per-seed values of tool accuracy, irrelevance accuracy, parse rate, general
retention exp(-KL), KL, agreement with the base, HumanEval NLL change and per-category accuracy.
Comparisons (``--compare``, default ``citi:lora,citi:full``): the difference of the means over the seeds
both labels ran, with a paired bootstrap 95% interval that resamples test examples (tool accuracy)
and probe prompts (retention) with replacement, the same draw for both labels and every seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRICS = ("tool_accuracy", "irrelevance_accuracy", "parse_rate", "general_retention", "kl", "agreement",
           "humaneval_nll_delta", "train_seconds", "retention_with_tools", "kl_with_tools", "headline_retention",
           "backbone_gate_general", "backbone_gate_general_with_tools", "backbone_gate_tool_call",
           "tool_accuracy_constrained", "irrelevance_accuracy_constrained", "parse_rate_constrained",
           "call_threshold", "tool_accuracy_calibrated", "irrelevance_accuracy_calibrated",
           "live_irrelevance_accuracy", "live_irrelevance_accuracy_calibrated")


def load_runs(dirs: list[str]) -> list[dict]:
    runs = []
    for d in dirs:
        files = sorted(Path(d).glob("*.json")) if Path(d).is_dir() else [Path(d)]
        for f in files:
            try:
                rec = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"skipping {f}: {exc}", file=sys.stderr)
                continue
            if isinstance(rec, dict) and "tool_accuracy" in rec and "per_example" in rec:
                rec["_file"] = str(f)
                runs.append(rec)
    return runs


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize_label(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["seed"])
    out: dict = {
        "method": runs[0]["method"],
        "overrides": runs[0].get("overrides", {}),
        "seeds": [r["seed"] for r in runs],
        "n_test": runs[0].get("n_test"),
        "n_probes": runs[0].get("n_probes"),
        "per_seed": {m: [r.get(m) for r in runs] for m in METRICS},
    }
    for m in METRICS:
        out[m] = _mean(out["per_seed"][m])
    cats = sorted({c for r in runs for c in r.get("per_category", {})})
    out["per_category"] = {c: _mean([r.get("per_category", {}).get(c) for r in runs]) for c in cats}
    out["per_seed"]["per_category"] = {c: [r.get("per_category", {}).get(c) for r in runs] for c in cats}
    he = [r.get("humaneval") or {} for r in runs]
    out["humaneval_base_nll"] = _mean([h.get("base_nll") for h in he])
    out["humaneval_tuned_nll"] = _mean([h.get("tuned_nll") for h in he])
    if len({json.dumps(r.get("overrides", {}), sort_keys=True) for r in runs}) > 1:
        out["warning"] = "runs of this label have different settings"
    out["abstention"] = abstention(runs)
    live = [r for r in runs if r.get("live_irrelevance_accuracy") is not None]
    if live:
        out["live_irrelevance_accuracy"] = _mean([r["live_irrelevance_accuracy"] for r in live])
        out["live_n"] = len(live[0]["live_per_example"])
        out["live_file"] = live[0].get("live_file", "live_irrelevance.jsonl")
        out["live_abstention"] = abstention(live, "live_per_example", "live_call_margins")
    return out


ABSTENTION_THRESHOLDS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


def _threshold_head(first: list[str]) -> list[str]:
    """Header and rule of a table with the columns ``first``, then one per abstention threshold."""
    columns = first + [f"t = {t:g}" for t in ABSTENTION_THRESHOLDS]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def abstention(runs: list[dict], outcomes: str = "per_example", margins: str = "call_margins") -> list[dict] | None:
    """Mean over the runs of :func:`~citi_engine.evaluate.tool_eval.abstention_curve` (runs with call margins)."""
    from citi_engine.evaluate.tool_eval import abstention_curve

    curves = [abstention_curve(r[outcomes], r[margins], ABSTENTION_THRESHOLDS)
              for r in runs if r.get(margins) and len(r[margins]) == len(r[outcomes])]
    if not curves:
        return None
    return [{"threshold": t, "seeds": len(curves),
             **{k: _mean([c[i][k] for c in curves]) for k in ("tool_accuracy", "irrelevance_accuracy", "held_back")}}
            for i, t in enumerate(ABSTENTION_THRESHOLDS)]


def _retention(kl: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(-(kl * tokens).sum(axis) / np.maximum(tokens.sum(axis), 1))


def paired_bootstrap(a_runs: dict[int, dict], b_runs: dict[int, dict], *, iterations: int, seed: int = 0) -> dict:
    """Difference a - b of tool accuracy and general retention, averaged over common seeds, with a paired
    bootstrap 95% interval (test examples and probes resampled with replacement, one draw for all seeds)."""
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        return {"seeds": [], "note": "no seed in common"}
    rng = np.random.default_rng(seed)
    out: dict = {"seeds": seeds}

    # Tool accuracy: per-example outcomes, matched by example id (greedy; and at each run's call threshold, where
    # both labels have it).
    for key, outcomes in (("tool_accuracy", "per_example"), ("tool_accuracy_calibrated", "per_example_calibrated")):
        if not all(runs[s].get(outcomes) for runs in (a_runs, b_runs) for s in seeds):
            continue
        ids = sorted(set.intersection(*[
            {o["id"] for o in runs[s][outcomes]} for runs in (a_runs, b_runs) for s in seeds]))
        if not ids:
            continue

        def matrix(runs, outcomes=outcomes, ids=frozenset(ids)):
            return np.array([[float(o["correct"]) for o in sorted(
                (o for o in runs[s][outcomes] if o["id"] in ids), key=lambda o: o["id"])] for s in seeds])

        a, b = matrix(a_runs), matrix(b_runs)
        observed = float((a.mean(1) - b.mean(1)).mean())
        draws = rng.integers(0, len(ids), size=(iterations, len(ids)))
        diffs = (a[:, draws].mean(-1) - b[:, draws].mean(-1)).mean(0)
        out[key] = {"diff": observed, "ci95": [float(np.percentile(diffs, 2.5)),
                                               float(np.percentile(diffs, 97.5))], "n": len(ids)}

    # Retention: per-probe KL and answer tokens, matched by probe position (the same probe list in every run).
    n_probes = min(len(runs[s].get("per_probe") or []) for runs in (a_runs, b_runs) for s in seeds)
    if n_probes:
        def arrays(runs):
            kl = np.array([[p["kl"] for p in runs[s]["per_probe"][:n_probes]] for s in seeds])
            tok = np.array([[p["tokens"] for p in runs[s]["per_probe"][:n_probes]] for s in seeds], dtype=float)
            return kl, tok

        (ka, ta), (kb, tb) = arrays(a_runs), arrays(b_runs)
        observed = float((_retention(ka, ta) - _retention(kb, tb)).mean())
        draws = rng.integers(0, n_probes, size=(iterations, n_probes))
        diffs = (_retention(ka[:, draws], ta[:, draws]) - _retention(kb[:, draws], tb[:, draws])).mean(0)
        out["general_retention"] = {"diff": observed, "ci95": [float(np.percentile(diffs, 2.5)),
                                                               float(np.percentile(diffs, 97.5))], "n": n_probes}
        # Headline retention: the lower of retention without and with unrelated tools offered (the same probes
        # asked both ways, resampled together), where both were measured.
        if all(runs[s].get("per_probe_with_tools") for runs in (a_runs, b_runs) for s in seeds):
            def headline(runs, idx):
                plain = _retention(*arrays(runs)) if idx is None else _retention(*(x[:, idx] for x in arrays(runs)))
                kl = np.array([[p["kl"] for p in runs[s]["per_probe_with_tools"][:n_probes]] for s in seeds])
                tok = np.array([[p["tokens"] for p in runs[s]["per_probe_with_tools"][:n_probes]] for s in seeds],
                               dtype=float)
                tools = _retention(kl, tok) if idx is None else _retention(kl[:, idx], tok[:, idx])
                return np.minimum(plain, tools)

            observed = float((headline(a_runs, None) - headline(b_runs, None)).mean())
            diffs = (headline(a_runs, draws) - headline(b_runs, draws)).mean(0)
            out["headline_retention"] = {"diff": observed, "ci95": [float(np.percentile(diffs, 2.5)),
                                                                    float(np.percentile(diffs, 97.5))],
                                         "n": n_probes}
    return out


def _fmt(x, pct=False, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}f}"


def _choice_cell(row: dict, key: str, pct: bool = False) -> str:
    """A candidate's number in the chosen-setting table, with the reference's on the same seeds beside it."""
    own, ref = _fmt(row[key], pct), row.get("reference")
    return own if ref is None else f"{own} (ref. {_fmt(ref[key], pct)})"


def render_markdown(merged: dict) -> str:
    lines = [
        f"# {merged.get('title') or 'Quality: tool-call accuracy vs general retention'}", "",
        f"Card: {merged['card']}; model: {merged['model']}; split: {merged['split']}; seeds: {merged['seeds']}; "
        f"commit: {merged['commit'] or 'unknown'}.", "",
        "Tool accuracy: AST-judged on the BFCL-derived split (function-disjoint from training). General retention: "
        "exp(-KL), KL = mean per-token KL(base || tuned) on the base model's greedy answers to the probe prompts. "
        "Agreement: exact match of greedy answers. HumanEval: change in mean NLL of canonical solutions. With tools: "
        "the same probes asked with unrelated tools offered in the system turn; headline: the lower of the two. "
        "Gates: mean backbone gate G(x)[0] of CITI's routers (1 = experts off) on general tokens and on the tokens "
        "that write a tool call.", "",
        "| label | seeds | tool acc % | irrelevance % | parse % | retention | with tools | headline | KL | "
        "agreement % | HumanEval NLL change | gate general | gate tool call | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in merged["methods"].items():
        if m.get("label", label) != label:
            label = f"{label} ({m['label']})"
        lines.append(
            f"| {label} | {len(m['seeds'])} | {_fmt(m['tool_accuracy'], True)} | "
            f"{_fmt(m['irrelevance_accuracy'], True)} | {_fmt(m['parse_rate'], True)} | "
            f"{_fmt(m['general_retention'], digits=4)} | {_fmt(m.get('retention_with_tools'), digits=4)} | "
            f"{_fmt(m.get('headline_retention'), digits=4)} | {_fmt(m['kl'], digits=4)} | "
            f"{_fmt(m['agreement'], True)} | {_fmt(m['humaneval_nll_delta'], digits=4)} | "
            f"{_fmt(m.get('backbone_gate_general'), digits=3)} | {_fmt(m.get('backbone_gate_tool_call'), digits=3)} | "
            f"{_fmt(m['train_seconds'], digits=0)} |")
    lines += ["", "## Per seed", "", "| label | seed | tool acc % | irrelevance % | retention | with tools | KL | "
              "HumanEval NLL change |", "|---|---|---|---|---|---|---|---|"]
    for label, m in merged["methods"].items():
        for i, s in enumerate(m["seeds"]):
            ps = m["per_seed"]
            lines.append(f"| {label} | {s} | {_fmt(ps['tool_accuracy'][i], True)} | "
                         f"{_fmt(ps['irrelevance_accuracy'][i], True)} | "
                         f"{_fmt(ps['general_retention'][i], digits=4)} | "
                         f"{_fmt(ps['retention_with_tools'][i], digits=4)} | {_fmt(ps['kl'][i], digits=4)} | "
                         f"{_fmt(ps['humaneval_nll_delta'][i], digits=4)} |")
    cats = sorted({c for m in merged["methods"].values() for c in m["per_category"]})
    if cats:
        lines += ["", "## Tool accuracy by category (%)", "", "| label | " + " | ".join(cats) + " |",
                  "|---" * (len(cats) + 1) + "|"]
        for label, m in merged["methods"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt(m["per_category"].get(c), True) for c in cats) + " |")
    held = {label: m for label, m in merged["methods"].items() if m.get("tool_accuracy_constrained") is not None}
    if held:
        lines += ["", "## Free and constrained decoding (`--constrained`: calls held to the tools' schemas)", "",
                  "| label | tool acc % free | constrained | irrelevance % free | constrained | parse % free | "
                  "constrained |", "|---|---|---|---|---|---|---|"]
        for label, m in held.items():
            lines.append(f"| {label} | {_fmt(m['tool_accuracy'], True)} | {_fmt(m['tool_accuracy_constrained'], True)} "
                         f"| {_fmt(m['irrelevance_accuracy'], True)} | "
                         f"{_fmt(m.get('irrelevance_accuracy_constrained'), True)} | {_fmt(m['parse_rate'], True)} | "
                         f"{_fmt(m.get('parse_rate_constrained'), True)} |")
    calibrated = {label: m for label, m in merged["methods"].items() if m.get("tool_accuracy_calibrated") is not None}
    if calibrated:
        lines += ["", "## At the call threshold each job chose on the validation split", "",
                  "Each job chose its call threshold t on the validation split as a job does on its held-out "
                  "examples (the t with the best balanced accuracy between calls kept and calls wrongly made, "
                  "`citi_engine.evaluate.tool_eval.choose_call_threshold`); the test and live sets were then answered "
                  "as the inference server answers with it: a bias of -t on the tokens that open `<tool_call>` while "
                  "the reply is blank. Cells: greedy -> at t (means over seeds).", "",
                  "| label | seeds | t | tool acc % | irrelevance % | live irrelevance % | tool acc % constrained |",
                  "|---|---|---|---|---|---|---|"]
        for label, m in calibrated.items():
            ps = m["per_seed"]["call_threshold"]
            lines.append(
                f"| {label} | {len(m['seeds'])} | {_fmt(m['call_threshold'], digits=2)} "
                f"({', '.join(_fmt(t, digits=2) for t in ps)}) | "
                f"{_fmt(m['tool_accuracy'], True)} -> {_fmt(m['tool_accuracy_calibrated'], True)} | "
                f"{_fmt(m['irrelevance_accuracy'], True)} -> {_fmt(m['irrelevance_accuracy_calibrated'], True)} | "
                f"{_fmt(m.get('live_irrelevance_accuracy'), True)} -> "
                f"{_fmt(m.get('live_irrelevance_accuracy_calibrated'), True)} | "
                f"{_fmt(m.get('tool_accuracy_constrained'), True)} |")
    curves = {label: m["abstention"] for label, m in merged["methods"].items() if m.get("abstention")}
    if curves:
        lines += ["", "## Calls held back by a margin (abstention curve)", "",
                  "A call is made only when the tokens that open `<tool_call>` lead every other token at the reply's "
                  "first position by at least t logits (a logit bias of -t there); from each run's greedy replies "
                  "and its call margins (`citi_engine.evaluate.tool_eval.call_margins`). t = 0 is greedy decoding. "
                  "Cells: tool accuracy % / irrelevance %.", "",
                  *_threshold_head(["label"])]
        for label, rows in curves.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{_fmt(r['tool_accuracy'], True)} / {_fmt(r['irrelevance_accuracy'], True)}" for r in rows) + " |")
    live = {label: m for label, m in merged["methods"].items() if m.get("live_irrelevance_accuracy") is not None}
    if live:
        files = ", ".join(sorted({f"`{m['live_file']}`" for m in live.values()}))
        lines += ["", "## Real users' functions: no call fits (BFCL live irrelevance)", "",
                  "Requests over functions from BFCL's live set, none of which fits the request and none of which the "
                  f"training data has ({files}, bench/build_bfcl_data.py): the share answered "
                  "without a call, greedy and with calls held back below a margin t (as above).", "",
                  *_threshold_head(["label", "cases"])]
        for label, m in live.items():
            rows = m.get("live_abstention") or []
            cells = [_fmt(r["irrelevance_accuracy"], True) for r in rows] or \
                [_fmt(m["live_irrelevance_accuracy"], True)] + ["-"] * (len(ABSTENTION_THRESHOLDS) - 1)
            lines.append(f"| {label} | {m['live_n']} | " + " | ".join(cells) + " |")
    if merged.get("choice"):
        c = merged["choice"]
        lines += ["", "## The setting the rule chooses", "",
                  f"Each candidate against `{c['reference']}` on the seeds both have: it passes when its tool accuracy "
                  f"and headline retention are each at most {c['tool_slack']:g} and {c['retention_slack']:g} below "
                  f"the reference's on those seeds"
                  + "".join(f" and its {k} at most {b:g}" for k, b in (c.get("ceilings") or {}).items())
                  + f"; of those that pass, the one that raises {c['goal']} most. Chosen: **{c['chosen']}**.", "",
                  f"| label | seeds | passes | tool acc % | headline retention | {c['goal']} |"
                  + "".join(f" {k} |" for k in (c.get("ceilings") or {}) if k != c["goal"]),
                  "|---|---|---|---|---|---|" + "---|" * len([k for k in (c.get("ceilings") or {}) if k != c["goal"]])]
        for label, row in c["labels"].items():
            lines.append(f"| {label} | {', '.join(map(str, row['seeds'])) or 'none in common'} | "
                         f"{'yes' if row['passed'] else 'no'} | {_choice_cell(row, 'tool_accuracy', True)} | "
                         f"{_choice_cell(row, 'headline_retention')} | {_choice_cell(row, c['goal'])} |"
                         + "".join(f" {_choice_cell(row, k)} |" for k in (c.get("ceilings") or {}) if k != c["goal"]))
    if merged.get("decode_checks"):
        lines += ["", "## The decode loop checked", "",
                  "The same test cases answered twice by one run, with two decode loops (`bench/quality.py "
                  "--decode-check`): replies the same (by fingerprint), verdicts that changed, and each loop's time.",
                  "", "| run | loops (first / second) | same replies | verdicts changed | tool acc % (second) | seconds (first / second) |", "|---|---|---|---|---|---|"]
        for c in merged["decode_checks"]:
            lines.append(f"| {c['run']} | {c['decode']} / {c['other']} | {c['same_replies']} of {c['cases']} | "
                         f"{c['verdicts_changed']} | {_fmt(c['tool_accuracy_other'], True)} | "
                         f"{c['seconds']:.1f} / {c['seconds_other']:.1f} |")
    if merged["comparisons"]:
        at_t = any(c.get("tool_accuracy_calibrated") for c in merged["comparisons"].values())
        lines += ["", "## Paired differences (bootstrap 95% intervals)", "",
                  "| comparison | seeds | tool accuracy (points) | " + ("at each one's t | " if at_t else "")
                  + "general retention | headline retention |", "|---|---|---|---|---|" + ("---|" if at_t else "")]
        for name, c in merged["comparisons"].items():
            ta, gr, hr = c.get("tool_accuracy"), c.get("general_retention"), c.get("headline_retention")
            tc = c.get("tool_accuracy_calibrated")
            tool = (f"{100 * ta['diff']:+.1f} [{100 * ta['ci95'][0]:+.1f}, {100 * ta['ci95'][1]:+.1f}]"
                    if ta else "n/a")
            cal = (f"{100 * tc['diff']:+.1f} [{100 * tc['ci95'][0]:+.1f}, {100 * tc['ci95'][1]:+.1f}] | " if tc
                   else "n/a | ") if at_t else ""
            ret = f"{gr['diff']:+.4f} [{gr['ci95'][0]:+.4f}, {gr['ci95'][1]:+.4f}]" if gr else "n/a"
            head = f"{hr['diff']:+.4f} [{hr['ci95'][0]:+.4f}, {hr['ci95'][1]:+.4f}]" if hr else "n/a"
            lines.append(f"| {name} | {c.get('seeds')} | {tool} | {cal}{ret} | {head} |")
    if merged.get("not_measured"):
        lines += ["", "## Not measured", ""]
        lines += [f"- {method}: {why}" for method, why in merged["not_measured"].items()]
    lines += ["", f"![tool accuracy vs general retention]({merged.get('plot', 'quality.png')})", ""]
    if merged.get("notes"):
        lines += [merged["notes"].rstrip(), ""]
    return "\n".join(lines)


def plot(merged: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), dpi=130)
    ax = fig.add_subplot()
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    markers = "osD^v"  # past eight labels the colours repeat, so the marker changes with them
    for i, (label, m) in enumerate(merged["methods"].items()):
        color, marker = colors[i % len(colors)], markers[(i // len(colors)) % len(markers)]
        key = "headline_retention" if m.get("headline_retention") is not None else "general_retention"
        xs, ys = m["per_seed"]["tool_accuracy"], m["per_seed"][key]
        ax.scatter(xs, ys, s=18, color=color, marker=marker, alpha=0.5)
        ax.scatter([m["tool_accuracy"]], [m[key]], s=90, color=color, marker=marker, edgecolor="black", label=label,
                   zorder=3)
    ax.set_xlabel("tool-call accuracy (AST)")
    ax.set_ylabel("headline retention: lower of exp(-KL) without and with tools")
    ax.set_title(f"{merged['model']} on {merged['card']} (small: seeds, large: mean)", fontsize=9)
    ax.ticklabel_format(useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def merge(runs: list[dict], comparisons: list[tuple[str, str]], iterations: int, commit: str | None) -> dict:
    by_label: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in runs:
        if r["seed"] in by_label[r["label"]]:
            print(f"warning: two runs of {r['label']} seed {r['seed']}; keeping {r['_file']}", file=sys.stderr)
        by_label[r["label"]][r["seed"]] = r
    order = {"base": 0, "lora": 1, "full": 2, "citi": 3}
    labels = sorted(by_label, key=lambda k: (order.get(k, 4), k))
    cards = sorted({r["card"] for r in runs})
    if len(cards) > 1:
        print(f"warning: runs from different cards {cards}; compare only numbers from one card", file=sys.stderr)
    merged = {
        "card": " / ".join(cards),
        "model": sorted({r.get("model") for r in runs})[0] if runs else None,
        "split": " / ".join(sorted({r.get("split", "?") for r in runs})),
        "seeds": sorted({r["seed"] for r in runs}),
        "methods": {label: summarize_label(list(by_label[label].values())) for label in labels},
        "comparisons": {},
        "commit": commit or next((r.get("commit") for r in runs if r.get("commit")), None),
        "decode_checks": [{"run": r["run_id"], **r["decode_check"]} for r in runs if r.get("decode_check")],
    }
    for a, b in comparisons:
        if a in by_label and b in by_label:
            merged["comparisons"][f"{a} - {b}"] = paired_bootstrap(by_label[a], by_label[b], iterations=iterations)
    return merged


def choose_setting(methods: dict[str, dict], reference: str, candidates: list[str], *, goal: str,
                   tool_slack: float = 0.01, retention_slack: float = 0.01,
                   ceilings: dict[str, float] | None = None) -> dict:
    """The rule a default is chosen by on the validation side: among ``reference`` and ``candidates`` (labels of
    ``methods``, each a :func:`summarize_label` summary), those whose tool accuracy and headline retention are each
    no more than their slack below the reference's, the one that raises the ``goal`` metric most over the reference;
    the reference when none does. Each candidate is compared with the reference on the seeds both have (means over
    those seeds), so a seed the candidate lacks cannot move the reference's side; a candidate with no seed in
    common does not pass. Returns the chosen label and, for each label, the seeds compared, whether it passed and
    its three numbers (with the reference's on the same seeds). ``ceilings`` ({metric: bound}) are further
    conditions a candidate must meet on its own, its mean over the compared seeds at most the bound (the router
    runs: the gate on tool-call tokens may not rise above the method issue's 0.2 while the general gate rises)."""
    ceilings = dict(ceilings or {})
    keys = ("tool_accuracy", "headline_retention", goal, *(k for k in ceilings if k != goal))

    def mean_on(label: str, seeds: list[int]) -> dict:
        m = methods[label]
        rows = [m["seeds"].index(s) for s in seeds]
        return {k: sum(m["per_seed"][k][i] for i in rows) / len(rows) for k in keys}

    ref_seeds = methods[reference]["seeds"]
    table = {reference: {"seeds": ref_seeds, "passed": True, **mean_on(reference, ref_seeds)}}
    best, best_gain = reference, 0.0
    for label in candidates:
        seeds = [s for s in methods[label]["seeds"] if s in ref_seeds] if label in methods else []  # not run: fails
        if not seeds:
            table[label] = {"seeds": [], "passed": False, **{k: None for k in keys}, "reference": None}
            continue
        m, ref = mean_on(label, seeds), mean_on(reference, seeds)
        passed = (m["tool_accuracy"] >= ref["tool_accuracy"] - tool_slack
                  and m["headline_retention"] >= ref["headline_retention"] - retention_slack
                  and all(m[k] <= bound for k, bound in ceilings.items()))
        table[label] = {"seeds": seeds, "passed": passed, **m, "reference": ref}
        gain = m[goal] - ref[goal]
        if passed and gain > best_gain:
            best, best_gain = label, gain
    return {"chosen": best, "reference": reference, "goal": goal, "tool_slack": tool_slack,
            "retention_slack": retention_slack, "ceilings": ceilings, "labels": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="folders (or files) of bench/quality.py results")
    p.add_argument("--out", default="bench/results", help="where quality.json/.md/.png go (default bench/results)")
    p.add_argument("--compare", default="citi:lora,citi:full",
                   help="comma list of A:B label pairs for paired bootstrap differences A - B")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap iterations")
    p.add_argument("--commit", default=None, help="commit to record (default: the runs')")
    p.add_argument("--labels", default=None, help="comma list: merge only runs of these labels")
    p.add_argument("--by-method", action="store_true", help="key the results by method (base, lora, full, citi) "
                   "instead of by label; each method must then have one label")
    p.add_argument("--expect", default="base,lora,full,citi", help="with --by-method: methods the results should "
                   "have; those without runs are listed as not measured")
    p.add_argument("--missing-note", default="no run finished", help="why an expected method has no runs")
    p.add_argument("--prefix", default="quality", help="file names: PREFIX.json, PREFIX.md, PREFIX.png")
    p.add_argument("--title", default=None, help="heading of the markdown file")
    p.add_argument("--notes", default=None, help="a markdown file appended to the results (what the numbers say, "
                   "what was not measured and why)")
    p.add_argument("--drop-constrained", default=None, metavar="LABELS",
                   help="comma list of labels whose constrained numbers are left out (a run whose constrained "
                        "eval was broken; say why in --notes)")
    p.add_argument("--choose", default=None, metavar="REF:CAND,CAND[:GOAL]",
                   help="apply the rule defaults are chosen by (choose_setting): the reference label, the candidate "
                        "labels, and the metric to raise (default live_irrelevance_accuracy)")
    p.add_argument("--choose-ceiling", default=None, metavar="METRIC=BOUND,...",
                   help="with --choose: a candidate passes only with each such metric at most its bound, e.g. "
                        "backbone_gate_tool_call=0.2")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    dropped = set((args.drop_constrained or "").split(","))
    for r in runs:
        if r["label"] in dropped:
            for key in [k for k in r if k.endswith("_constrained")]:
                del r[key]
    if args.labels:
        keep = set(args.labels.split(","))
        runs = [r for r in runs if r["label"] in keep]
    if not runs:
        print(f"no run files found in {args.runs}", file=sys.stderr)
        return 1
    labels_of: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        labels_of[r["method"]].add(r["label"])
    if args.by_method:
        several = {m: sorted(ls) for m, ls in labels_of.items() if len(ls) > 1}
        if several:
            print(f"--by-method needs one label per method; pick with --labels: {several}", file=sys.stderr)
            return 2
        for r in runs:
            r["label_given"], r["label"] = r["label"], r["method"]
    pairs = [tuple(c.split(":", 1)) for c in args.compare.split(",") if ":" in c]
    merged = merge(runs, pairs, args.bootstrap, args.commit)
    if args.by_method:
        for method, m in merged["methods"].items():
            m["label"] = next(iter(labels_of[method]))
        merged["not_measured"] = {m: args.missing_note for m in args.expect.split(",") if m and m not in labels_of}
    if args.choose:
        reference, candidates, *goal = args.choose.split(":")
        ceilings = {}
        for item in filter(None, (args.choose_ceiling or "").split(",")):
            metric, _, bound = item.partition("=")
            try:
                ceilings[metric] = float(bound)
            except ValueError:
                p.error(f"--choose-ceiling takes METRIC=BOUND items, e.g. backbone_gate_tool_call=0.2; got {item!r}")
        merged["choice"] = choose_setting(merged["methods"], reference, candidates.split(","),
                                          goal=goal[0] if goal else "live_irrelevance_accuracy", ceilings=ceilings)
    merged["title"] = args.title
    merged["plot"] = f"{args.prefix}.png"
    if args.notes:
        merged["notes"] = Path(args.notes).read_text()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.prefix}.json").write_text(json.dumps(merged, indent=1))
    (out / f"{args.prefix}.md").write_text(render_markdown(merged))
    plot(merged, out / f"{args.prefix}.png")
    print(render_markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
