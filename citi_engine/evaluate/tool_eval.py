"""Tool-call accuracy: read a test set, let the model answer greedily in batches, judge every reply.

Test sets come in two forms (:func:`load_tool_cases` tells them apart):
- our JSONL (CONTRACTS, "Tool test format"): ``{"messages", "tools", "category", "ground_truth"}``, or a
  training-format line whose last message is an assistant turn (its calls become exact ground truth);
- BFCL's files: a question file (``id``, ``question``, ``function``) plus its ``possible_answer`` file.

Reading and scoring are torch-free; only :func:`evaluate_tool_calls` generates (and imports torch).

``constrained=True`` measures the same model with every call it writes held to the case's tools and their
parameter schemas by constrained decoding (:func:`citi_engine.constrained.text_or_calls_grammar`, the
serving runtime's loop): the model still decides whether to call and which function, but a call cannot
name an undefined function or carry arguments that do not validate. Text before a call is not allowed
in this mode (the training format never has any). The gap between the free and the constrained accuracy
is what the grammar buys at serving time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from citi_engine.data.chat_format import call_open_tokens, call_threshold_bias
from citi_engine.data.schemas import Problem
from citi_engine.errors import DataValidationError
from citi_engine.evaluate.judge import (
    REASONS,
    call_name_and_arguments,
    exact_ground_truth,
    judge,
    to_json_schema,
)

IRRELEVANCE = "irrelevance"


@dataclass
class ToolCase:
    """One test conversation: the prompt (``messages`` up to the last user turn), the ``tools`` offered
    (OpenAI shape), and the accepted calls (``ground_truth``; ``[]`` means no call is right)."""

    id: str
    category: str
    messages: list[dict]
    tools: list[dict]
    ground_truth: list[dict]

    @property
    def expects_call(self) -> bool:
        return bool(self.ground_truth)

    def conversation(self) -> dict:
        """The ``{"messages", "tools"}`` that :func:`citi_engine.generate.generate_chat` takes."""
        return {"messages": self.messages, "tools": self.tools}

    def gold_example(self) -> dict | None:
        """The conversation answered with the ground truth's calls, in the training format (each parameter at
        its first accepted value; one that may be omitted left out), or None when no call is right."""
        if not self.ground_truth:
            return None
        calls = []
        for k, expected in enumerate(self.ground_truth):
            (name, params), = expected.items()
            args = {p: _first_accepted(values) for p, values in params.items()
                    if not (isinstance(values, list) and "" in values)}
            calls.append({"id": f"call_{k}", "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
        return {"messages": [*self.messages, {"role": "assistant", "content": None, "tool_calls": calls}],
                "tools": self.tools}

    def to_dict(self) -> dict:
        return asdict(self)


def _first_accepted(values):
    """One value that BFCL's accepted-values shape accepts (objects hold accepted values per key)."""
    value = values[0] if isinstance(values, list) and values else values
    if isinstance(value, dict):
        return {k: _first_accepted(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ loading


def default_category(ground_truth: list[dict], tools: list[dict]) -> str:
    """BFCL's category names from the shape of the answer: irrelevance, simple, multiple, parallel,
    parallel_multiple."""
    if not ground_truth:
        return IRRELEVANCE
    several_tools = len(tools) > 1
    if len(ground_truth) == 1:
        return "multiple" if several_tools else "simple"
    return "parallel_multiple" if several_tools else "parallel"


def _bfcl_tool(fn: dict) -> dict:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "function",
        "function": {"name": fn["name"], "description": fn.get("description", ""), "parameters": to_json_schema(params)},
    }


def _category_from_id(case_id: str) -> str:
    # BFCL ids are "<category>_<n>" (e.g. "parallel_multiple_12").
    return re.sub(r"_\d+$", "", case_id)


def _read_json_lines(path: Path, what: str) -> list[tuple[int, dict]]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"{what} {path} is not UTF-8 text", [Problem(0, "invalid_encoding", str(exc))], param="tool_test"
        ) from exc
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataValidationError(
                f"{what} {path}: line {n} is not valid JSON ({exc.msg}); write one JSON object per line",
                [Problem(n, "invalid_json", exc.msg)], param="tool_test",
            ) from exc
        if not isinstance(row, dict):
            raise DataValidationError(
                f"{what} {path}: line {n} is not a JSON object", [Problem(n, "not_an_object", "not an object")],
                param="tool_test",
            )
        rows.append((n, row))
    return rows


def _load_bfcl(path: Path, answers: Path | None, rows: list[tuple[int, dict]]) -> list[ToolCase]:
    if answers is None:
        guess = path.parent / "possible_answer" / path.name
        answers = guess if guess.is_file() else None
    truth: dict[str, list] = {}
    if answers is not None:
        truth = {row["id"]: row.get("ground_truth", []) for _, row in _read_json_lines(answers, "BFCL answer file")}
    cases = []
    for n, row in rows:
        case_id = str(row["id"])
        category = _category_from_id(case_id)
        if len(row["question"]) != 1:
            raise DataValidationError(
                f"{path}: line {n} ({case_id}) is a multi-turn BFCL case; only single-turn categories "
                "(simple, multiple, parallel, parallel_multiple, irrelevance, live_*) can be judged by AST",
                [Problem(n, "invalid_field", "multi-turn question")], param="tool_test",
            )
        if IRRELEVANCE in category:
            gt: list = []
        elif case_id in truth:
            gt = truth[case_id]
        else:
            raise DataValidationError(
                f"{path}: no accepted answer for {case_id}; pass BFCL's answer file (possible_answer/{path.name}) "
                "as the answers file",
                [Problem(n, "invalid_field", f"no ground truth for {case_id}")], param="tool_test",
            )
        cases.append(ToolCase(
            id=case_id,
            category=category,
            messages=list(row["question"][0]),
            tools=[_bfcl_tool(fn) for fn in row["function"]],
            ground_truth=gt,
        ))
    return cases


def _check_ground_truth(gt: object, n: int, path: Path) -> list[dict]:
    ok = isinstance(gt, list) and all(
        isinstance(c, dict) and len(c) == 1 and isinstance(next(iter(c.values())), dict)
        and all(isinstance(v, list) for v in next(iter(c.values())).values())
        for c in gt
    )
    if not ok:
        raise DataValidationError(
            f"{path}: line {n} has a malformed ground_truth; write a list of calls, each "
            '{"<function name>": {"<param>": [accepted values...]}}, or [] when no call is right',
            [Problem(n, "invalid_field", "malformed ground_truth")], param="tool_test",
        )
    return gt  # type: ignore[return-value]


def _load_jsonl(path: Path, rows: list[tuple[int, dict]]) -> list[ToolCase]:
    cases = []
    for n, row in rows:
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataValidationError(
                f"{path}: line {n} has no 'messages' list", [Problem(n, "missing_messages", "no messages")],
                param="tool_test",
            )
        tools = row.get("tools") or []
        if "ground_truth" in row:
            gt = _check_ground_truth(row["ground_truth"], n, path)
        elif messages[-1].get("role") == "assistant":
            # A training-format line: the assistant's calls are the one right answer.
            try:
                gt = exact_ground_truth(messages[-1].get("tool_calls") or [])
            except (ValueError, TypeError) as exc:
                raise DataValidationError(
                    f"{path}: line {n}: the assistant's tool call arguments are not a JSON object ({exc})",
                    [Problem(n, "invalid_arguments_json", str(exc))], param="tool_test",
                ) from exc
            messages = messages[:-1]
        else:
            raise DataValidationError(
                f"{path}: line {n} has neither 'ground_truth' nor a final assistant turn to take the answer from; "
                "add \"ground_truth\": [...] (or [] when no call is right)",
                [Problem(n, "invalid_field", "no ground truth")], param="tool_test",
            )
        known = {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}
        for call in gt:
            name = next(iter(call))
            if name not in known:
                raise DataValidationError(
                    f"{path}: line {n}: the answer calls '{name}', which is not among the line's tools; "
                    "add its schema to 'tools'",
                    [Problem(n, "unknown_function", f"'{name}' is not in tools")], param="tool_test",
                )
        cases.append(ToolCase(
            id=str(row.get("id", f"line_{n}")),
            category=str(row.get("category") or default_category(gt, tools)),
            messages=messages,
            tools=tools,
            ground_truth=gt,
        ))
    return cases


def cases_from_dicts(rows: Sequence[dict], source: str = "<test examples>") -> list[ToolCase]:
    """Test cases from dicts in the tool test format (or training format ending in an assistant turn)."""
    return _load_jsonl(Path(source), list(enumerate(rows, start=1)))


def stratified_head(cases: Sequence[ToolCase], limit: int | None) -> list[ToolCase]:
    """The first ``limit`` cases taken round-robin over categories (every category stays represented),
    in file order within each category."""
    if limit is None or limit >= len(cases):
        return list(cases)
    by_cat: dict[str, list[ToolCase]] = defaultdict(list)
    for case in cases:
        by_cat[case.category].append(case)
    picked: list[ToolCase] = []
    queues = list(by_cat.values())
    i = 0
    while len(picked) < limit:
        queue = queues[i % len(queues)]
        if queue:
            picked.append(queue.pop(0))
        i += 1
    chosen = {id(c) for c in picked}
    return [c for c in cases if id(c) in chosen]


def load_tool_cases(
    path: str | Path, answers: str | Path | None = None, *, limit: int | None = None
) -> list[ToolCase]:
    """Read a tool test set: our JSONL, or a BFCL question file (with its answer file, found next to it
    under ``possible_answer/`` when not given). ``limit`` keeps that many cases, spread over categories.

    Raises :class:`~citi_engine.errors.DataValidationError` saying which line is wrong and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"tool test file {path} does not exist", param="tool_test")
    rows = _read_json_lines(path, "tool test file")
    if not rows:
        raise DataValidationError(f"tool test file {path} holds no test cases", param="tool_test")
    first = rows[0][1]
    if "question" in first and "function" in first:
        cases = _load_bfcl(path, Path(answers) if answers else None, rows)
    else:
        cases = _load_jsonl(path, rows)
    return stratified_head(cases, limit)


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class ToolEvalResult:
    """Scores of one evaluation; :meth:`to_dict` is the ``tool`` section of a report."""

    n: int
    correct: int
    per_category: dict[str, dict]
    parse_rate: float | None
    irrelevance_accuracy: float | None
    failure_counts: dict[str, int]
    outcomes: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    constrained: bool = False
    unconstrained: int = 0  # with constrained: cases generated free because their schemas did not compile

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy"] = self.accuracy
        return d


def _parses(calls: list[dict]) -> bool:
    try:
        return bool(calls) and all(isinstance(call_name_and_arguments(c)[1], dict) for c in calls)
    except (ValueError, TypeError):
        return False


def reply_hash(text: str) -> str:
    """A short fingerprint of a reply's text: two evaluations' replies compared case by case without the texts."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def score_replies(cases: Sequence[ToolCase], replies: Sequence, *, keep_reply_chars: int = 600) -> ToolEvalResult:
    """Judge each reply (a :class:`~citi_engine.generate.Generation`, or a dict with ``text`` and
    ``tool_calls``) against its case, and sum up.

    Accuracy is over all cases; ``parse_rate`` is the share of replies that parse as calls among the
    cases that expect calls; ``irrelevance_accuracy`` the accuracy on cases whose answer is no call.
    """
    if len(cases) != len(replies):
        raise ValueError(f"{len(cases)} cases but {len(replies)} replies")
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    reasons: Counter[str] = Counter()
    outcomes, failures = [], []
    parsed = expecting = irr_total = irr_correct = 0
    for case, reply in zip(cases, replies, strict=True):
        text = reply.get("text", "") if isinstance(reply, dict) else reply.text
        calls = (reply.get("tool_calls") if isinstance(reply, dict) else reply.tool_calls) or []
        verdict = judge(calls, case.ground_truth, case.tools, text=text)
        per_cat[case.category][0] += 1
        per_cat[case.category][1] += int(verdict.correct)
        if case.expects_call:
            expecting += 1
            parsed += int(_parses(calls))
        else:
            irr_total += 1
            irr_correct += int(verdict.correct)
        outcomes.append({"id": case.id, "category": case.category, "correct": verdict.correct,
                         "reason": verdict.reason, "expects_call": case.expects_call,
                         "opens_blank": text[:1].isspace(), "reply_hash": reply_hash(text)})
        if not verdict.correct:
            reasons[verdict.reason] += 1
            failures.append({"id": case.id, "category": case.category, "reason": verdict.reason,
                             "detail": verdict.detail, "reply": text[:keep_reply_chars]})
    correct = sum(o["correct"] for o in outcomes)
    return ToolEvalResult(
        n=len(cases),
        correct=correct,
        per_category={
            cat: {"n": n, "correct": c, "accuracy": c / n} for cat, (n, c) in sorted(per_cat.items())
        },
        parse_rate=parsed / expecting if expecting else None,
        irrelevance_accuracy=irr_correct / irr_total if irr_total else None,
        failure_counts={r: reasons[r] for r in REASONS if reasons[r]},
        outcomes=outcomes,
        failures=failures,
    )


def evaluate_tool_calls(
    model,
    tokenizer,
    cases: Sequence[ToolCase],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    should_cancel: Callable[[], bool] | None = None,
    constrained: bool = False,
    call_threshold: float = 0.0,
    decode: str = "dynamic",
) -> ToolEvalResult:
    """Generate greedy replies for ``cases`` (batched) and score them with :func:`score_replies`.

    ``constrained``: calls held to the case's tools and schemas (see the module docstring).
    ``call_threshold``: a reply opens with a call only when its call margin (:func:`call_margins`) is above
    this; generated by the serving runtime with that bias on the tokens that open a call, as the inference
    server serves an adapter with a calibrated threshold (0: plain greedy decoding).
    ``decode``: the KV cache of the decode loop (:data:`citi_engine.generate.DECODE_MODES`): ``dynamic``,
    ``static``, ``cuda_graphs`` (each step replayed from a CUDA graph on a GPU: the same greedy replies up to
    the card's arithmetic, far fewer kernel launches for a small model) or ``compiled_graphs`` (that with the step
    compiled by ``torch.compile``).
    """
    if constrained or call_threshold > 0:
        replies, unconstrained = _runtime_replies(model, tokenizer, cases, batch_size=batch_size,
                                                  max_new_tokens=max_new_tokens, should_cancel=should_cancel,
                                                  constrained=constrained, call_threshold=call_threshold,
                                                  decode=decode)
        result = score_replies(cases, replies)
        result.constrained, result.unconstrained = constrained, unconstrained
        return result
    from citi_engine.generate import generate_chat

    replies = generate_chat(
        model, tokenizer, [c.conversation() for c in cases], max_new_tokens=max_new_tokens,
        batch_size=batch_size, temperature=0.0, should_cancel=should_cancel, decode=decode,
    )
    return score_replies(cases, replies)


def call_margins(model, tokenizer, cases: Sequence[ToolCase], *, batch_size: int = 16) -> list[float]:
    """How strongly the model opens each case's reply with a call, from one prefill of its prompt.

    At the reply's first position: the largest logit of a token that opens ``<tool_call>``
    (:func:`~citi_engine.data.chat_format.call_open_tokens`) minus the largest logit of any other token. Above 0,
    greedy decoding starts a call. Raising the bar to a margin ``t > 0`` (a logit bias of ``-t`` on those tokens
    while the reply is empty) turns every call whose margin is below ``t`` into a text reply, so one
    greedy pass and these margins give the whole trade between calls made and calls held back
    (:func:`abstention_curve`) without generating again.
    """
    import torch

    from citi_engine.generate import (
        encode_prompt,
        eval_mode,
        model_device,
        pad_left,
        prefill,
        prefill_chunk_for,
    )

    opening = torch.tensor(call_open_tokens(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [encode_prompt(tokenizer, c.messages, c.tools) for c in cases]
    margins: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_left(prompts[start:start + batch_size], pad, model_device(model))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, _ = prefill(model, ids, mask, positions, prefill_chunk_for(len(ids)))
            call = logits[:, opening.to(logits.device)].max(-1).values
            logits[:, opening.to(logits.device)] = float("-inf")
            margins += (call - logits.max(-1).values).tolist()
    return margins


def abstention_curve(outcomes: Sequence[dict], margins: Sequence[float], thresholds: Sequence[float]) -> list[dict]:
    """Tool and irrelevance accuracy if only calls with a margin of at least ``t`` were made, for each ``t`` >= 0.

    ``outcomes`` are :func:`score_replies`'s (greedy replies); a case whose margin is in (0, t) becomes a text
    reply: right if it expects no call, wrong if it expects one. Cases at or below 0 keep their outcome.
    """
    rows = []
    for t in thresholds:
        correct = irr = irr_correct = 0
        for outcome, margin in zip(outcomes, margins, strict=True):
            held_back = 0 < margin < t
            expects_none = not _expects_call(outcome)
            right = expects_none if held_back else outcome["correct"]
            correct += int(right)
            if expects_none:
                irr += 1
                irr_correct += int(right)
        rows.append({"threshold": t, "tool_accuracy": correct / len(outcomes) if outcomes else None,
                     "irrelevance_accuracy": irr_correct / irr if irr else None,
                     "held_back": sum(1 for m in margins if 0 < m < t)})
    return rows


def choose_call_threshold(outcomes: Sequence[dict], margins: Sequence[float]) -> dict:
    """The call threshold that a held-out set supports: the ``t`` whose :func:`abstention_curve` row has the
    highest balanced accuracy (the mean of the accuracy on cases that expect a call and on those that expect
    none), the smallest such ``t`` on a tie. Candidates are 0 and the midpoints between consecutive positive
    margins (and one past the largest), so every way of holding back the least confident calls is tried.

    Returns ``threshold`` with the set's counts and its accuracies at 0 and at the threshold; the threshold is
    0 (plain greedy decoding) when the set lacks either kind of case.
    """
    calls = sum(1 for o in outcomes if _expects_call(o))
    nones = len(outcomes) - calls
    positive = sorted({m for m in margins if m > 0})
    candidates = [0.0] + [(a + b) / 2 for a, b in zip(positive, positive[1:], strict=False)]
    candidates += [positive[-1] + 1.0] if positive else []
    rows = abstention_curve(outcomes, margins, candidates) if calls and nones else []
    best = rows[0] if rows else None
    for row in rows:
        row["call_accuracy"] = _call_accuracy(outcomes, margins, row["threshold"])
        row["balanced_accuracy"] = (row["call_accuracy"] + row["irrelevance_accuracy"]) / 2
        if row["balanced_accuracy"] > best["balanced_accuracy"] + 1e-12:
            best = row
    out = {"threshold": best["threshold"] if best else 0.0, "n_call_cases": calls, "n_no_call_cases": nones}
    if best:
        out.update(at_zero={k: rows[0][k] for k in ("call_accuracy", "irrelevance_accuracy", "balanced_accuracy")},
                   at_threshold={k: best[k] for k in ("call_accuracy", "irrelevance_accuracy", "balanced_accuracy",
                                                      "held_back")})
    return out


def calibrate_call_threshold(model, tokenizer, cases: Sequence[ToolCase], outcomes: Sequence[dict], *,
                             batch_size: int = 16, seed: int = 0) -> dict:
    """Choose the call threshold (:func:`choose_call_threshold`) on a held-out set the model was scored on
    (``outcomes``: :func:`score_replies`'s, greedy). A set with no case that expects no call (a user's held-out
    tool examples, typically) gets :func:`no_call_cases` built from its calls; their outcome is read from their
    margins (a margin above 0 is a greedy call), so they cost one prefill each and no generation.
    """
    margins = call_margins(model, tokenizer, cases, batch_size=batch_size)
    outcomes, built = list(outcomes), []
    if all(_expects_call(o) for o in outcomes):
        built = no_call_cases(cases, seed=seed)
        built_margins = call_margins(model, tokenizer, built, batch_size=batch_size) if built else []
        outcomes += [{"id": c.id, "category": IRRELEVANCE, "correct": m <= 0, "expects_call": False}
                     for c, m in zip(built, built_margins, strict=True)]
        margins += built_margins
    return {**choose_call_threshold(outcomes, margins), "built_no_call_cases": len(built)}


def _expects_call(outcome: dict) -> bool:
    return outcome.get("expects_call", outcome["category"] != IRRELEVANCE)


def _call_accuracy(outcomes: Sequence[dict], margins: Sequence[float], t: float) -> float:
    """Accuracy on the cases that expect a call if calls with a margin in (0, t) were held back."""
    pairs = [(o, m) for o, m in zip(outcomes, margins, strict=True) if _expects_call(o)]
    return sum(o["correct"] and not 0 < m < t for o, m in pairs) / len(pairs)


def no_call_cases(cases: Sequence[ToolCase], *, seed: int = 0) -> list[ToolCase]:
    """Cases that expect no call, one per case that expects one: its request with a tool list that lacks the
    functions it needs (:func:`citi_engine.data.augment.build_negatives`, as the training negatives are
    built). A held-out set of calls only becomes a set that can choose a call threshold with these."""
    from citi_engine.data.augment import build_negatives

    examples = [e for e in (c.gold_example() for c in cases) if e is not None]
    negatives = build_negatives(examples, 1.0, seed=seed + 1) if examples else []
    return [ToolCase(id=f"no_call_{k}", category=IRRELEVANCE, messages=n["messages"][:-1], tools=n["tools"],
                     ground_truth=[]) for k, n in enumerate(negatives)]


def _runtime_replies(model, tokenizer, cases: Sequence[ToolCase], *, batch_size: int, max_new_tokens: int,
                     should_cancel: Callable[[], bool] | None, constrained: bool,
                     call_threshold: float, decode: str = "dynamic") -> tuple[list[dict], int]:
    """Greedy replies from the serving runtime, longest prompts first in batches: under each case's text-or-calls
    grammar when ``constrained``, with a bias of ``-call_threshold`` on the tokens that open a call when it is above 0.
    Also how many cases had to go free (a schema the grammar library cannot compile)."""
    from citi_engine.constrained import GrammarError, compile_grammar, text_or_calls_grammar
    from citi_engine.data.chat_format import parse_reply
    from citi_engine.errors import Cancelled
    from citi_engine.generate import encode_prompt, eval_mode
    from citi_engine.serving import GenerationRequest, generate

    bias = call_threshold_bias(tokenizer, call_threshold)
    requests, unconstrained = [], 0
    for case in cases:
        grammar = None
        if constrained and case.tools:
            try:
                grammar = compile_grammar(text_or_calls_grammar(case.tools), tokenizer)
            except GrammarError:
                unconstrained += 1
        requests.append(GenerationRequest(prompt_ids=encode_prompt(tokenizer, case.messages, case.tools),
                                          max_new_tokens=max_new_tokens, grammar=grammar,
                                          opening_bias=dict(bias) if case.tools else {}))
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            generate(model, tokenizer, [requests[i] for i in order[start:start + batch_size]], decode=decode)
    return [{"text": r.text, "tool_calls": parse_reply(r.text, opening_only=bool(r.opening_bias))[1]}
            for r in requests], unconstrained
