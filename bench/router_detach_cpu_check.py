"""Does ``routing_detach`` move the router where the method issue wants it? A CPU check on the built-in model.

    python bench/router_detach_cpu_check.py --out bench/results/router_detach_cpu_check   # 16 min on 2 cores
    python bench/router_detach_cpu_check.py --settings token_weight_1_input_detached \
        --prefix router_tw1_input_cpu_check --out bench/results/router_detach_cpu_check   # 11 min
    python bench/router_detach_cpu_check.py --settings routing_gate_sigmoid \
        --prefix router_gate_sigmoid_cpu_check --out bench/results/router_detach_cpu_check

Two CITI jobs on SmolLM2-135M-Instruct, fp32 on CPU, the same seed, data and budget, one with the shipped settings
and one with ``hyperparameters.routing_detach`` (the experts' gates reach each layer's output without their
gradient, so only the routing terms train the routers), or with ``--settings`` others of ``SETTINGS`` (the
token-level objective at 1.0 with and without ``routing_detach_input``, the balancing loss over per-token means):
the small example set
(``examples/tools_train.jsonl``, 33 tool conversations; ``examples/general.jsonl``, 24 general ones), ``--steps``
optimizer steps over the three stages. Each job's own report gives the router's separation (mean backbone gate
G(x)[0] on the tokens of general probes, without and with tools offered, and on the tokens that write the test
calls), retention on the probes and tool accuracy on ``examples/tools_test.jsonl``.

``shipped`` is the checkout's defaults: up to 7840f31 those summed the balancing loss over each example's tokens
(``routing_balance: sum``), which the results in ``bench/results/router_detach_cpu_check/`` before
``router_balance_mean_cpu_check`` were measured with; since then they take per-token means.

What it can say: whether the gates move the way the setting is meant to move them, in a real model trained by the
real job. What it cannot: quality. Twenty test cases and a few probes after a few dozen CPU steps are no measure
of tool accuracy or retention; those are the GPU pool's (``bench/plans/router_val.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from provenance import commit as provenance_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"shipped": {}, "routing_detach": {"routing_detach": True},
            "token_weight_1": {"routing_token_weight": 1.0},
            "token_weight_1_input_detached": {"routing_token_weight": 1.0, "routing_detach_input": True},
            "routing_balance_mean": {"routing_balance": "mean"},
            "routing_gate_sigmoid": {"routing_gate": "sigmoid"}}
KEYS = ("backbone_gate_general", "backbone_gate_general_with_tools", "backbone_gate_tool_call",
        "headline_retention", "tool_accuracy")


def run_job(name: str, overrides: dict, out: Path, steps: int, seed: int) -> dict:
    """One CITI job in this process; its report's summary, the per-layer gates and its wall time."""
    from citi_engine.train import finetune
    from citi_engine.training.config import FinetuneConfig

    hp = {"batch_size": 4, "max_length": 1024, "importance_examples": 16, "importance_batch_size": 4,
          "eval_examples": 20, "eval_probes": 8, "eval_max_new_tokens": 48, "eval_humaneval": 0,
          **overrides}
    cfg = FinetuneConfig(training_file=str(ROOT / "examples" / "tools_train.jsonl"),
                         general_file=str(ROOT / "examples" / "general.jsonl"),
                         validation_file=str(ROOT / "examples" / "tools_test.jsonl"),
                         out_dir=str(out / name), dtype="fp32", device="cpu", seed=seed, checkpoint_every=0,
                         hyperparameters=hp, budget={"max_steps": steps})
    start = time.perf_counter()
    report = json.loads(Path(finetune(cfg).report_path).read_text())
    router = report.get("router") or {}
    return {"settings": overrides, "seconds": round(time.perf_counter() - start, 1),
            **{k: report["summary"].get(k) for k in KEYS},
            "per_layer_general": (router.get("general") or {}).get("per_layer"),
            "per_layer_tool_call": (router.get("tool_call") or {}).get("per_layer")}


def render(result: dict) -> str:
    lines = [f"# {', '.join(result['runs'])} on CPU: where the router's gates go", "",
             f"SmolLM2-135M-Instruct, fp32, {result['machine']}; commit {result['commit']}; seed {result['seed']}, "
             f"{result['steps']} optimizer steps (batch 4) over the three stages on the example data "
             "(`bench/router_detach_cpu_check.py`). Gates: mean backbone gate G(x)[0] (1 = experts off). "
             "A check of the mechanism, not of quality: 20 test cases and 8 probes after a few dozen CPU steps.", "",
             "| setting | gate general | gate general, tools offered | gate tool call | headline retention "
             "| tool accuracy (20 cases) | seconds |", "|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else "n/a" for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the jobs and the results (.md, .json)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="shipped,routing_detach",
                   help=f"comma list of jobs to run, of: {', '.join(SETTINGS)}")
    p.add_argument("--prefix", default="router_detach_cpu_check", help="file names: PREFIX.json, PREFIX.md")
    args = p.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        p.error(f"--settings takes names of: {', '.join(SETTINGS)}; got {args.settings!r}")
    import platform

    commit = provenance_commit(short=True) or "unknown"
    runs = {name: run_job(name, SETTINGS[name], args.out / "jobs", args.steps, args.seed) for name in names}
    result = {"commit": commit, "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or 'x86-64'})",
              "seed": args.seed, "steps": args.steps, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.prefix}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.prefix}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
