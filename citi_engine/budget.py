"""Budgets: how much a job may spend, and how that becomes a number of steps per stage.

A job may cap its training by steps, by trained tokens and by wall-clock seconds, in any
combination; the run stops at the first cap it reaches. Caps are spread over the stages in
proportion to their epochs (citi: 1/3/1 by default), so a short budget still runs every stage.

A step or token budget too small for one step of every stage is refused before any model is
loaded (:func:`check_budget`). A time budget counts everything the job does (scoring, replay,
training, evaluation); it becomes a number of steps once the first training steps have shown how
fast a step is (:meth:`StagePlan.fit_to_time`).

Torch-free: the API imports this module to refuse a hopeless budget at submit time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from citi_engine.errors import BudgetError
from citi_engine.ranges import Range, check_ranges, is_finite_number, setting

# The largest caps a job may set: far beyond any real job, small enough that no plan overflows or loops.
MAX_STEPS = 10_000_000
MAX_TOKENS = 10**12
MAX_SECONDS = 30 * 24 * 3600.0


@dataclass
class Budget:
    """The most a job may spend. ``None`` means no cap of that kind."""

    max_steps: int | None = setting(
        None, "Stop after this many optimizer steps, summed over all stages.", Range(1, MAX_STEPS, whole=True)
    )
    max_tokens: int | None = setting(
        None, "Stop once this many tokens (prompt and answer, padding excluded) have been trained on.",
        Range(1, MAX_TOKENS, whole=True),
    )
    max_seconds: float | None = setting(
        None, "Wall-clock limit for the whole job: loading, scoring, replay, training and evaluation. "
        "Turned into a number of steps from the speed of the first steps.", Range(0.0, MAX_SECONDS, lo_open=True),
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                setattr(self, name, int(value))  # 1e6 from JSON is a whole number
        check_ranges(self, "budget")

    def to_dict(self) -> dict:
        return asdict(self)


def split_in_proportion(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` whole steps over stages in proportion to ``weights``, each stage getting at least one.

    Exact rational arithmetic (whatever the size of ``total``): each stage gets the floor of its exact
    share (at least 1); the steps left over go, one at a time, to the stage furthest below its exact
    share. The parts always add up to ``total``; each correction loop runs fewer than ``len(weights)`` times.
    """
    n = len(weights)
    total = int(total)
    if total < n:
        raise ValueError(f"cannot give each of {n} stages a step out of {total}")
    if any(not is_finite_number(w) or w <= 0 for w in weights):
        raise ValueError(f"stage weights must be positive finite numbers, got {weights}")
    fractions = [Fraction(w) for w in weights]
    wsum = sum(fractions)
    exact = [total * w / wsum for w in fractions]
    parts = [max(1, math.floor(x)) for x in exact]
    for _ in range(n):  # the minimum of one pushed the sum over: take from the most over-served
        if sum(parts) <= total:
            break
        i = max((i for i in range(n) if parts[i] > 1), key=lambda i: parts[i] - exact[i])
        parts[i] -= 1
    for _ in range(n):
        if sum(parts) >= total:
            break
        i = max(range(n), key=lambda i: exact[i] - parts[i])
        parts[i] += 1
    assert sum(parts) == total, (total, weights, parts)
    return parts


def minimum_tokens(n_stages: int, tokens_per_step: float) -> int:
    """Tokens needed for one step of every stage, at the given mean tokens per step."""
    return int(math.ceil(n_stages * tokens_per_step))


def check_budget(budget: Budget, *, n_stages: int, tokens_per_step: float, stage_names: list[str] | None = None) -> None:
    """Refuse a step or token budget that cannot pay for one step of every stage.

    Call it before loading the model: it needs only the plan's shape and the data's token counts.
    """
    stages = f" ({', '.join(stage_names)})" if stage_names else ""
    if budget.max_steps is not None and budget.max_steps < n_stages:
        raise BudgetError(
            f"max_steps={budget.max_steps} is too small: this method runs {n_stages} stage(s){stages} and needs "
            f"at least {n_stages} steps, one per stage; raise max_steps to {n_stages} or more",
            param="max_steps",
        )
    if budget.max_tokens is not None:
        need = minimum_tokens(n_stages, tokens_per_step)
        if budget.max_tokens < need:
            raise BudgetError(
                f"max_tokens={budget.max_tokens} is too small: one step of every stage{stages} trains about "
                f"{need} tokens with this data and batch size ({tokens_per_step:.0f} a step); raise max_tokens "
                f"to {need} or more, or lower the batch size",
                param="max_tokens",
            )


@dataclass
class StagePlan:
    """How many steps each stage runs, and where each stage must stop on tokens and time.

    ``token_limits[i]`` and ``time_limits[i]`` are cumulative: stage i ends once the job has trained
    that many tokens in total, or its clock has passed that many seconds. A stage always runs at
    least one step, so every stage changes its parameters even when a limit is hit early.
    """

    names: list[str]
    epochs: list[float]
    steps: list[int]
    token_limits: list[int | None]
    time_limits: list[float | None] = field(default_factory=list)
    time_fitted: bool = False

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StagePlan:
        return cls(**d)

    def fit_to_time(
        self,
        *,
        stage_index: int,
        steps_done_in_stage: int,
        seconds_per_step: float,
        now_s: float,
        deadline_s: float,
    ) -> None:
        """Shrink the remaining steps so training ends by ``deadline_s`` (seconds on the run clock).

        Called once, after the first steps of the first stage have been timed. Steps already run
        are kept; what is left is shared by the stages in proportion to their epochs, never growing
        past the plan made from the other caps.
        """
        remaining_steps = max(0, int((deadline_s - now_s) / max(seconds_per_step, 1e-9)))
        later = list(range(stage_index, len(self.names)))
        affordable = steps_done_in_stage + remaining_steps
        if affordable < len(later):
            affordable = len(later)  # one step per stage, whatever the clock says
        if affordable < sum(self.steps[i] for i in later):
            shares = split_in_proportion(affordable, [self.epochs[i] for i in later])
            for i, share in zip(later, shares, strict=True):
                floor = steps_done_in_stage if i == stage_index else 1
                self.steps[i] = max(floor, min(self.steps[i], share))
        # The hard limits guard against a later slow-down (e.g. longer batches) too.
        span = max(deadline_s - now_s, 0.0)
        weights = [self.steps[i] for i in later]
        wsum = float(sum(weights)) or 1.0
        acc = now_s
        limits: list[float | None] = [None] * len(self.names)
        for i, w in zip(later, weights, strict=True):
            acc += span * w / wsum
            limits[i] = acc
        self.time_limits = limits
        self.time_fitted = True


def plan_stages(
    names: list[str],
    epochs: list[float],
    natural_steps: list[int],
    budget: Budget,
    *,
    tokens_per_step: float,
    tokens_done: int = 0,
) -> StagePlan:
    """Plan the steps of each stage from its epochs (``natural_steps``) and the step and token caps.

    Each cap is turned into a total number of steps, split over the stages by epochs; a stage never
    runs more steps than its epochs ask for, and always at least one (a budget too small for that was
    refused earlier by :func:`check_budget`). Time is fitted later, once step speed is known.
    """
    caps = []
    if budget.max_steps is not None:
        caps.append(budget.max_steps)
    if budget.max_tokens is not None:
        caps.append(max(len(names), int((budget.max_tokens - tokens_done) / max(tokens_per_step, 1.0))))
    steps = list(natural_steps)
    if caps:
        shares = split_in_proportion(max(min(caps), len(names)), epochs)
        steps = [max(1, min(n, s)) for n, s in zip(natural_steps, shares, strict=True)]
    token_limits: list[int | None] = [None] * len(names)
    if budget.max_tokens is not None:
        # Cumulative shares: a stage that trains fewer tokens than its share leaves them to the next.
        acc = 0.0
        wsum = float(sum(steps))
        for i, s in enumerate(steps):
            acc += budget.max_tokens * s / wsum
            token_limits[i] = int(acc)
        token_limits[-1] = budget.max_tokens
    return StagePlan(names=list(names), epochs=list(epochs), steps=steps, token_limits=token_limits,
                     time_limits=[None] * len(names))


class RunClock:
    """Seconds since the run started, carried across resumes (a resumed run adds its own time)."""

    def __init__(self, already_spent_s: float = 0.0):
        self._start = time.monotonic() - already_spent_s

    def elapsed(self) -> float:
        return time.monotonic() - self._start
