"""Write an evaluation report next to an adapter: ``report.json``, ``report.md`` and PNG plots.

Torch-free; matplotlib is imported only to draw (through its object API, so no GUI backend is touched).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from citi_engine.files import write_json_atomic

PLOTS = {
    "tool_accuracy": "eval_tool_accuracy.png",
    "failures": "eval_failures.png",
    "retention": "eval_retention_kl.png",
}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def summarize(tool: dict | None, retention: dict | None, retention_with_tools: dict | None = None,
              router: dict | None = None) -> dict:
    """The headline numbers of a report from its sections (any may be None).

    ``headline_retention`` is the lower of the retention without tools and with unrelated tools offered:
    what a user keeps is bounded by the worse of the two.
    """
    he = (retention or {}).get("humaneval") or {}
    plain = retention["general_retention"] if retention else None
    with_tools = retention_with_tools["general_retention"] if retention_with_tools else None
    known = [v for v in (plain, with_tools) if v is not None]
    router = router or {}
    return {
        "headline_retention": min(known) if known else None,
        "retention_with_tools": with_tools,
        "kl_with_tools": retention_with_tools["kl"] if retention_with_tools else None,
        "backbone_gate_general": router.get("backbone_gate_general"),
        "backbone_gate_general_with_tools": router.get("backbone_gate_general_with_tools"),
        "backbone_gate_tool_call": router.get("backbone_gate_tool_call"),
        "tool_accuracy": tool["accuracy"] if tool else None,
        "irrelevance_accuracy": tool.get("irrelevance_accuracy") if tool else None,
        "parse_rate": tool.get("parse_rate") if tool else None,
        "n_test": tool["n"] if tool else 0,
        "general_retention": retention["general_retention"] if retention else None,
        "kl": retention["kl"] if retention else None,
        "agreement": retention["agreement"] if retention else None,
        "n_probes": retention["n_probes"] if retention else 0,
        "humaneval_base_nll": he.get("base_nll"),
        "humaneval_tuned_nll": he.get("tuned_nll"),
        "humaneval_nll_delta": he.get("nll_delta"),
    }


def render_markdown(report: dict, *, max_failures: int = 30) -> str:
    """``report`` as Markdown: headline table, per-category accuracy, failure reasons and examples, retention."""
    s = report.get("summary") or summarize(report.get("tool"), report.get("retention"),
                                           report.get("retention_with_tools"), report.get("router"))
    lines = ["# Evaluation report", ""]
    if report.get("model"):
        lines.append(f"Base model: `{report['model']}`" + (f", method: {report['method']}" if report.get("method")
                                                            else ""))
        lines.append("")
    lines += [
        "| metric | value |", "|---|---|",
        f"| tool-call accuracy | {_pct(s['tool_accuracy'])} ({s['n_test']} cases) |",
        f"| irrelevance accuracy (no call when none fits) | {_pct(s['irrelevance_accuracy'])} |",
        f"| replies that parse as calls (cases expecting calls) | {_pct(s['parse_rate'])} |",
        *([f"| tool-call accuracy, calls constrained to the tools' schemas | {_pct(s['tool_accuracy_constrained'])} |",
            f"| irrelevance accuracy, constrained | {_pct(s.get('irrelevance_accuracy_constrained'))} |"]
          if s.get("tool_accuracy_constrained") is not None else []),
        f"| headline retention (lower of the two below) | {_num(s.get('headline_retention'))} |",
        f"| general retention exp(-KL) | {_num(s['general_retention'])} ({s['n_probes']} probes) |",
        f"| general retention with unrelated tools offered | {_num(s.get('retention_with_tools'))} |",
        f"| mean per-token KL(base \\|\\| tuned) | {_num(s['kl'])} |",
        f"| exact agreement with base answers | {_pct(s['agreement'])} |",
        f"| HumanEval canonical NLL base / tuned (delta) | {_num(s['humaneval_base_nll'])} / "
        f"{_num(s['humaneval_tuned_nll'])} ({_num(s['humaneval_nll_delta'])}) |",
        "",
    ]
    tool = report.get("tool")
    if tool:
        lines += ["## Tool-call accuracy by category", "", "| category | cases | correct | accuracy |",
                  "|---|---|---|---|"]
        for cat, c in tool["per_category"].items():
            lines.append(f"| {cat} | {c['n']} | {c['correct']} | {_pct(c['accuracy'])} |")
        lines.append("")
        if tool.get("failure_counts"):
            lines += ["## Failures by reason", "", "| reason | count |", "|---|---|"]
            lines += [f"| {r} | {n} |" for r, n in tool["failure_counts"].items()]
            lines.append("")
            lines += [f"## Failures (first {min(max_failures, len(tool['failures']))} of {len(tool['failures'])})", ""]
            for f in tool["failures"][:max_failures]:
                reply = f["reply"].replace("`", "'").replace("\n", " ")[:300]
                lines.append(f"- `{f['id']}` ({f['category']}): **{f['reason']}**: {f['detail']}  \n  reply: `{reply}`")
            lines.append("")
    retention = report.get("retention")
    if retention:
        lines += ["## General retention", "",
                  f"{retention['n_probes']} probe prompts, {retention['answer_tokens']} base-answer tokens scored. "
                  "KL is measured teacher-forced on the base model's own greedy answers.", ""]
        he = retention.get("humaneval")
        if he and "skipped" in he:
            lines += [f"HumanEval skipped: {he['skipped']}", ""]
        elif he:
            lines.append(f"HumanEval: {he['n']} problems, {he['tokens']} solution tokens; mean NLL base "
                         f"{he['base_nll']:.4f}, tuned {he['tuned_nll']:.4f}, change {he['nll_delta']:+.4f}.")
            if "tuned_pass_at_1" in he:
                lines.append(f"pass@1 base {_pct(he.get('base_pass_at_1'))}, tuned {_pct(he['tuned_pass_at_1'])}.")
            lines.append("")
        if retention.get("disagreements"):
            lines += ["Examples where the tuned answer differs from the base answer:", ""]
            for d in retention["disagreements"]:
                clip = lambda t: t.replace("\n", " ").replace("`", "'")[:200]  # noqa: E731
                lines.append(f"- prompt: {clip(d['prompt'])}  \n  base: `{clip(d['base'])}`  \n"
                             f"  tuned: `{clip(d['tuned'])}`")
            lines.append("")
    router = report.get("router")
    if router:
        lines += ["## Router separation", "",
                  "Mean backbone gate G(x)[0] of the MOLoRA routers (1: experts off, 0: experts fully on), "
                  "teacher-forced. A router that does its job is near 1 on general tokens and near 0 on the "
                  "tokens that write a tool call.", "",
                  "| tokens | mean backbone gate | tokens counted |", "|---|---|---|"]
        for key, label in (("general", "general probes (prompt + base answer)"),
                           ("general_with_tools", "general probes, unrelated tools offered"),
                           ("tool_call", "ground-truth tool calls of the test cases")):
            d = router.get(key) or {}
            lines.append(f"| {label} | {_num(d.get('mean'), 3)} | {d.get('tokens', 0)} |")
        layers = sorted({*((router.get("general") or {}).get("per_layer") or {}),
                         *((router.get("tool_call") or {}).get("per_layer") or {})})
        if layers:
            lines += ["", "| component | general | with tools | tool call |", "|---|---|---|---|"]
            for name in layers:
                row = [_num(((router.get(k) or {}).get("per_layer") or {}).get(name), 3)
                       for k in ("general", "general_with_tools", "tool_call")]
                lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    plots = report.get("plots") or {}
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    return "\n".join(lines)


def _bar(path: Path, labels: list[str], values: list[float], *, title: str, ylabel: str, ylim=None,
         annotate=None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.6), dpi=120)
    ax = fig.add_subplot()
    bars = ax.bar(labels, values, color="#4C72B0")
    for bar, text in zip(bars, annotate or [], strict=False):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_plots(out_dir: str | os.PathLike, report: dict) -> dict[str, str]:
    """Draw the report's plots into ``out_dir``; return ``{name: file name}`` of those drawn."""
    out = Path(out_dir)
    drawn: dict[str, str] = {}
    tool = report.get("tool")
    if tool and tool.get("per_category"):
        cats = list(tool["per_category"])
        acc = [tool["per_category"][c]["accuracy"] for c in cats]
        _bar(out / PLOTS["tool_accuracy"], [*cats, "overall"], [*acc, tool["accuracy"]],
             title="Tool-call accuracy by category", ylabel="accuracy", ylim=(0, 1.05),
             annotate=[f"{a:.2f}" for a in [*acc, tool["accuracy"]]])
        drawn["tool_accuracy"] = PLOTS["tool_accuracy"]
    if tool and tool.get("failure_counts"):
        reasons = list(tool["failure_counts"])
        _bar(out / PLOTS["failures"], reasons, [tool["failure_counts"][r] for r in reasons],
             title="Failures by reason", ylabel="cases")
        drawn["failures"] = PLOTS["failures"]
    retention = report.get("retention")
    if retention and retention.get("per_probe"):
        from matplotlib.figure import Figure

        kls = [p["kl"] for p in retention["per_probe"]]
        fig = Figure(figsize=(5, 3.6), dpi=120)
        ax = fig.add_subplot()
        ax.hist(kls, bins=min(30, max(5, len(kls) // 5)), color="#55A868")
        ax.axvline(retention["kl"], color="black", linestyle="--", label=f"mean {retention['kl']:.4f}")
        ax.set_title(f"KL(base || tuned) per probe; retention exp(-KL) = {retention['general_retention']:.3f}",
                     fontsize=9)
        ax.set_xlabel("mean per-token KL on the base answer")
        ax.set_ylabel("probes")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / PLOTS["retention"])
        drawn["retention"] = PLOTS["retention"]
    return drawn


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(adapter_dir: str | os.PathLike, report: dict) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``adapter_dir``; return the paths written.

    Fills in ``report["summary"]`` when missing and records the plot files under ``report["plots"]``.
    Plots are skipped (and said so in ``report["plots_skipped"]``) where matplotlib is not installed.
    """
    out = Path(adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.setdefault("summary", summarize(report.get("tool"), report.get("retention"),
                                           report.get("retention_with_tools"), report.get("router")))
    try:
        report["plots"] = write_plots(out, report)
    except ImportError as exc:
        report["plots"] = {}
        report["plots_skipped"] = f"matplotlib is not installed ({exc})"
    paths = {"json": out / "report.json", "md": out / "report.md"}
    write_json_atomic(paths["json"], _json_safe(report))
    paths["md"].write_text(render_markdown(report))
    for name, file in report["plots"].items():
        paths[name] = out / file
    return paths
