"""The values a numeric job setting may take: one finite range per setting, checked in one place.

Every numeric field of the budget, the components and the hyperparameters carries a :class:`Range` in its
metadata (``metadata["range"]``), next to its help text, which states it too. :func:`check_ranges` refuses a
value outside it, and any value that is not a finite number (``inf``, ``nan``, ``1e400`` from JSON), with a
:class:`SettingError` naming the setting. The bounds are far beyond any sensible job; they exist so that no
setting can make a worker allocate without limit or compute forever. Torch-free: the API checks with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class SettingError(ValueError):
    """A setting with an impossible value; ``param`` names it as the job's JSON does (``budget.max_steps``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Range:
    """From ``lo`` to ``hi`` (``lo_open``/``hi_open``: that end excluded); ``whole``: whole numbers only."""

    lo: float
    hi: float
    whole: bool = False
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        lo, hi = _num(self.lo), _num(self.hi)
        if not (self.lo_open or self.hi_open):
            return f"{kind} from {lo} to {hi}"
        return f"{kind} {'>' if self.lo_open else '>='} {lo} and {'<' if self.hi_open else '<='} {hi}"

    def contains(self, value: Any) -> bool:
        """True when ``value`` is a finite number (an int when ``whole``) inside the range."""
        if not is_finite_number(value) or (self.whole and not isinstance(value, int)):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def is_finite_number(value: Any) -> bool:
    """An int or a finite float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def setting(default: Any, help: str, rng: Range | None = None) -> Any:  # noqa: A002 - the metadata key is "help"
    """A dataclass field with its help text and, for numbers, its range (stated in the help too)."""
    metadata: dict[str, Any] = {"help": help if rng is None else f"{help} Range: {rng}."}
    if rng is not None:
        metadata["range"] = rng
    return dataclasses.field(default=default, metadata=metadata)


def check_ranges(obj: Any, where: str) -> None:
    """Refuse any field of the dataclass ``obj`` outside its range; ``None`` passes where it is the default.

    ``where`` prefixes the names in messages and ``param`` (``hyperparameters``); "" for top-level settings.
    """
    for f in dataclasses.fields(obj):
        rng = f.metadata.get("range")
        if rng is None:
            continue
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        if not rng.contains(value):
            why = "" if is_finite_number(value) or value is None else " (not a finite number)"
            name = f"{where}.{f.name}" if where else f.name
            raise SettingError(f"{name} must be {rng}, got {value!r}{why}", param=name)


def range_of(cls: type, name: str) -> Range:
    """The range of field ``name`` of the dataclass ``cls``."""
    return {f.name: f.metadata.get("range") for f in dataclasses.fields(cls)}[name]
