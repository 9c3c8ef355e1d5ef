"""Evaluation of a tuned model: tool-call accuracy (AST-judged) and general retention against its base.

- :mod:`.judge` (torch-free): is one reply right, and if not, why.
- :mod:`.tool_eval`: read a test set (our JSONL or BFCL files), generate, score.
- :mod:`.retention`: KL(base || tuned) on the base's answers to probe prompts, agreement, HumanEval NLL.
- :mod:`.report`: ``report.json``, ``report.md`` and plots next to the adapter.

:func:`evaluate_adapter` runs all of it; the trainer calls it at the end of a job, ``citi eval`` from
the command line. Importing this package does not import torch (the API uses the judge and the loader).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from citi_engine.evaluate.judge import REASONS, Verdict, judge
from citi_engine.evaluate.report import summarize, write_report
from citi_engine.evaluate.tool_eval import (
    ToolCase,
    cases_from_dicts,
    evaluate_tool_calls,
    load_tool_cases,
    score_replies,
    stratified_head,
)

__all__ = [
    "REASONS",
    "ToolCase",
    "Verdict",
    "as_tool_cases",
    "evaluate_adapter",
    "evaluate_tool_calls",
    "judge",
    "load_tool_cases",
    "score_replies",
    "summarize",
    "write_report",
]


def as_tool_cases(test_cases) -> list[ToolCase]:
    """Test cases from a path, a list of :class:`ToolCase`, or a list of dicts in the tool test format
    (a training-format dict whose last message is an assistant turn counts too)."""
    if test_cases is None:
        return []
    if isinstance(test_cases, str | os.PathLike):
        return load_tool_cases(test_cases)
    cases = list(test_cases)
    if all(isinstance(c, ToolCase) for c in cases):
        return cases
    return cases_from_dicts(cases)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def evaluate_adapter(
    model,
    tokenizer,
    base_model,
    test_cases,
    probes: Sequence | None,
    out_dir: str | os.PathLike | None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    test_limit: int | None = None,
    probe_limit: int | None = None,
    retention_max_new_tokens: int = 128,
    humaneval: bool = True,
    humaneval_file: str | os.PathLike | None = None,
    humaneval_limit: int | None = None,
    pass_at_1: bool = False,
    metadata: dict | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_event: Callable[[dict], None] | None = None,
    constrained: bool = False,
    calibrate_calls: bool = False,
    seed: int = 0,
    call_threshold: float = 0.0,
    decode: str = "dynamic",
) -> dict:
    """Evaluate a tuned ``model`` and write its report into ``out_dir`` (skipped when ``out_dir`` is None).

    ``test_cases``: a tool test file, :class:`ToolCase` objects or tool-test-format dicts (empty or None:
    no tool section). ``probes``: general probe prompts (None: ``PROBE_PROMPTS``; empty: no retention).
    ``base_model``: the untuned model for retention; when None and ``model`` is a peft model, its base is
    reached by switching the adapters off (``modules_to_save`` included), and when None otherwise (a
    ``full`` fine-tune) retention is skipped with a note. ``test_limit`` / ``probe_limit`` cap the work.
    ``metadata`` (model spec, method, ...) is copied into the report. ``constrained``: also evaluate the tool
    cases with every call held to the case's tools and schemas (constrained decoding); that result is
    ``tool_constrained`` beside ``tool``, and the summary gains ``tool_accuracy_constrained``,
    ``irrelevance_accuracy_constrained`` and ``parse_rate_constrained``. ``calibrate_calls``: choose the call
    threshold on the tool cases (:func:`~citi_engine.evaluate.tool_eval.calibrate_call_threshold`; ``seed``
    for the no-call cases it may build): ``calibration`` in the report, ``call_threshold`` in the summary.
    ``call_threshold`` above 0: the tool cases answered once more as served with that threshold
    (``tool_at_threshold``; ``tool_accuracy_at_threshold`` and ``irrelevance_accuracy_at_threshold`` in the summary).
    ``decode``: the decode loop's KV cache for every tool reply, free, constrained or at the threshold
    (:func:`citi_engine.generate.generate_ids`).

    Returns the report: ``summary`` (headline numbers), ``tool`` (see
    :class:`~citi_engine.evaluate.tool_eval.ToolEvalResult`), ``retention`` (see
    :func:`~citi_engine.evaluate.retention.general_retention`), ``seconds``, ``created``, ``plots``.
    """

    def emit(message: str, **extra) -> None:
        if on_event is not None:
            on_event({"type": extra.pop("type", "stage"), "stage": "eval", "message": message, **extra})

    report: dict = {**(metadata or {}), "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "tool": None, "retention": None, "seconds": {}}
    cases = stratified_head(as_tool_cases(test_cases), test_limit)
    if cases:
        emit(f"evaluating tool calls on {len(cases)} test cases")
        start = time.perf_counter()
        result = evaluate_tool_calls(model, tokenizer, cases, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     should_cancel=should_cancel, decode=decode)
        report["seconds"]["tool"] = time.perf_counter() - start
        report["tool"] = result.to_dict()
        if constrained:
            emit(f"evaluating tool calls on {len(cases)} test cases, calls constrained to the tools' schemas")
            start = time.perf_counter()
            held = evaluate_tool_calls(model, tokenizer, cases, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       should_cancel=should_cancel, constrained=True, decode=decode)
            report["seconds"]["tool_constrained"] = time.perf_counter() - start
            report["tool_constrained"] = held.to_dict()
        if call_threshold > 0:
            emit(f"evaluating tool calls on {len(cases)} test cases at call threshold {call_threshold:g}")
            start = time.perf_counter()
            at_t = evaluate_tool_calls(model, tokenizer, cases, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       should_cancel=should_cancel, call_threshold=call_threshold, decode=decode)
            report["seconds"]["tool_at_threshold"] = time.perf_counter() - start
            report["tool_at_threshold"] = {**at_t.to_dict(), "call_threshold": call_threshold}
        if calibrate_calls:
            from citi_engine.evaluate.tool_eval import calibrate_call_threshold

            emit(f"choosing the call threshold on {len(cases)} test cases")
            start = time.perf_counter()
            report["calibration"] = calibrate_call_threshold(model, tokenizer, cases, result.outcomes,
                                                             batch_size=batch_size, seed=seed)
            report["seconds"]["calibration"] = time.perf_counter() - start

    if probes is None:
        from citi_engine.data.prompts import PROBE_PROMPTS

        probes = PROBE_PROMPTS
    if probes and (base_model is not None or _is_peft(model)):
        from citi_engine.evaluate import retention as ret

        n = min(len(probes), probe_limit) if probe_limit is not None else len(probes)
        emit(f"measuring general retention on {n} probe prompts")
        start = time.perf_counter()
        kwargs = dict(limit=probe_limit, max_new_tokens=retention_max_new_tokens, batch_size=batch_size,
                      humaneval=humaneval, humaneval_file=humaneval_file, humaneval_limit=humaneval_limit,
                      pass_at_1=pass_at_1, should_cancel=should_cancel)
        measure = (functools.partial(ret.general_retention, base_model) if base_model is not None
                   else ret.general_retention_from_peft)
        report["retention"] = measure(model, tokenizer, probes, **kwargs)
        report["seconds"]["retention"] = time.perf_counter() - start
        # The same probes asked by an agent that offers tools none of them needs.
        from citi_engine.data.prompts import probes_with_tools

        emit(f"measuring general retention on {n} probe prompts with unrelated tools offered")
        start = time.perf_counter()
        report["retention_with_tools"] = measure(
            model, tokenizer, probes_with_tools([_probe_text(p) for p in probes]), **{**kwargs, "humaneval": False})
        report["seconds"]["retention_with_tools"] = time.perf_counter() - start
    elif probes:
        report["retention_skipped"] = "no base model to compare with: pass base_model (needed for method 'full')"

    from citi_engine.evaluate.routing import separation, tool_call_gates

    report["router"] = separation(
        (report["retention"] or {}).get("router_gates"),
        (report.get("retention_with_tools") or {}).get("router_gates"),
        tool_call_gates(model, tokenizer, cases, batch_size=batch_size) if cases else None,
    )
    report["summary"] = summarize(report["tool"], report["retention"], report.get("retention_with_tools"),
                                  report["router"])
    if report.get("tool_constrained"):
        held = report["tool_constrained"]
        report["summary"].update(tool_accuracy_constrained=held["accuracy"],
                                 irrelevance_accuracy_constrained=held["irrelevance_accuracy"],
                                 parse_rate_constrained=held["parse_rate"])
    if report.get("calibration"):
        report["summary"]["call_threshold"] = report["calibration"]["threshold"]
    if report.get("tool_at_threshold"):
        at_t = report["tool_at_threshold"]
        report["summary"].update(tool_accuracy_at_threshold=at_t["accuracy"],
                                 irrelevance_accuracy_at_threshold=at_t["irrelevance_accuracy"])
    if out_dir is not None:
        write_report(out_dir, report)
    s = report["summary"]
    parts = []
    if s["tool_accuracy"] is not None:
        parts.append(f"tool accuracy {s['tool_accuracy']:.3f}")
    if s.get("tool_accuracy_constrained") is not None:
        parts.append(f"constrained {s['tool_accuracy_constrained']:.3f}")
    if s.get("call_threshold") is not None:
        parts.append(f"call threshold {s['call_threshold']:.2f}")
    if s["general_retention"] is not None:
        parts.append(f"general retention {s['general_retention']:.3f} (KL {s['kl']:.4f})")
    if s.get("retention_with_tools") is not None:
        parts.append(f"with tools offered {s['retention_with_tools']:.3f}")
    if s.get("backbone_gate_general") is not None:
        parts.append(f"backbone gate general {s['backbone_gate_general']:.2f}, tool calls "
                     f"{_fmt(s.get('backbone_gate_tool_call'))}")
    emit(", ".join(parts) or "nothing to evaluate", type="eval", summary=s)
    return report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _probe_text(probe) -> str:
    """The user text of a probe given as a string or a one-turn conversation."""
    if isinstance(probe, str):
        return probe
    messages = probe.get("messages", probe) if isinstance(probe, dict) else probe
    return messages[-1].get("content", "")


def __getattr__(name: str):
    # The retention functions need torch; load them only when asked for.
    if name in ("general_retention", "general_retention_from_peft", "adapters_disabled"):
        from citi_engine.evaluate import retention

        return getattr(retention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
