"""A profile of a few training steps of a real job, for finding where a step's time goes.

Off unless ``CITI_PROFILE_DIR`` names a folder: then the main process runs steps ``CITI_PROFILE_SKIP`` (2) to
``CITI_PROFILE_SKIP + CITI_PROFILE_STEPS - 1`` (3 steps) of every stage under the torch profiler (the first
steps of a stage warm up) and writes ``<stage>.profile.txt`` (the ops and kernels by self time, then by input
shape) and ``<stage>.profile.json`` into that folder: each step's wall time, and on a GPU the kernels' own busy
time and launches a step. Wall time far above the busy time means the step waits on the host (Python, op
dispatch, kernel launches), not on the GPU. A job's own steps are what is profiled, so a job with the settings in
question answers the question; the profiler slows the steps it watches, so their times and the job's
``tokens_per_s`` are not a speed measurement.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("citi.profile")


def kernel_report(prof, cuda: bool, title: str, top: int = 30) -> tuple[str, dict[str, Any]]:
    """The profile as text and its ``top`` kernels as a dict.

    The text: everything by self time, then the ops by input shape (which matmul is which). On a GPU, device
    times: the table shows each kernel and the aten op that launched it (an op's self device time is its
    kernels'); the dict keeps the device events alone, whose times add up to the GPU's busy time ``busy_us``,
    and how many there were (``launches``). On CPU, the ops' CPU times.
    """
    from torch.autograd import DeviceType

    where = "device" if cuda else "cpu"
    self_us, total_us = attrgetter(f"self_{where}_time_total"), attrgetter(f"{where}_time_total")
    averages = prof.key_averages()
    kernels = [e for e in averages if not cuda or (e.device_type != DeviceType.CPU
                                                   and not getattr(e, "is_user_annotation", False))]
    busy = sum(self_us(e) for e in kernels)
    unit = "CUDA" if cuda else "CPU"
    text = "\n".join([
        f"== {title}: by self {unit} time ==",
        averages.table(sort_by=f"self_{where}_time_total", row_limit=top, max_name_column_width=100),
        f"== {title}: ops by input shape, by total {unit} time ==",
        prof.key_averages(group_by_input_shape=True).table(sort_by=f"{where}_time_total", row_limit=top,
                                                          max_name_column_width=60),
    ])
    launches = sum(e.count for e in kernels) if cuda else None  # on CPU every op, nested ones too: not launches
    kernels = sorted((e for e in kernels if self_us(e) > 0), key=self_us, reverse=True)[:top]
    doc = {"title": title, "time": f"self {unit} time, microseconds", "busy_us": busy, "launches": launches,
           "top": [{"name": e.key, "calls": e.count, "self_us": self_us(e), "total_us": total_us(e),
                    "share": self_us(e) / busy if busy else None} for e in kernels]}
    return text, doc


class StepProfiler:
    """Profiles steps ``skip`` .. ``skip + steps - 1`` of one stage (:func:`stage_profiler` builds it)."""

    def __init__(self, out_dir: Path, stage: str, device: torch.device, *, steps: int = 3, skip: int = 2) -> None:
        self.out_dir, self.stage, self.cuda = out_dir, stage, device.type == "cuda"
        self.first, self.last = skip, skip + steps - 1
        self._prof = None
        self._walls: list[float] = []

    @contextlib.contextmanager
    def step(self, stage_step: int) -> Iterator[None]:
        """Around one step (``stage_step`` counted from 0 in the stage); profiles it when it is one of ours."""
        if not self.first <= stage_step <= self.last:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        if self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=activities, record_shapes=True)
            self._prof.__enter__()
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self._walls.append(time.perf_counter() - t0)
        if stage_step == self.last:
            self.finish()

    def finish(self) -> None:
        """Stop and write the files (also when the stage ends before the last profiled step)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        n = len(self._walls)
        text, doc = kernel_report(prof, self.cuda, f"{self.stage}, {n} training steps of the job")
        doc.update(kind="profile", stage=self.stage, steps=n, wall_s=[round(w, 5) for w in self._walls],
                   device=torch.cuda.get_device_name() if self.cuda else "cpu")
        if self.cuda and n:
            doc["busy_s_per_step"] = round(doc["busy_us"] / 1e6 / n, 5)
            doc["launches_per_step"] = round(doc["launches"] / n, 1)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"{self.stage}.profile.txt").write_text(text + "\n")
            (self.out_dir / f"{self.stage}.profile.json").write_text(json.dumps(doc, indent=1))
        except OSError as exc:  # a diagnostic must never fail the job
            log.warning("could not write the profile of stage %s to %s: %s", self.stage, self.out_dir, exc)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def stage_profiler(stage: str, device: torch.device, is_main: bool) -> StepProfiler | None:
    """The profiler of ``stage`` when ``CITI_PROFILE_DIR`` is set (main process only), else None."""
    folder = os.environ.get("CITI_PROFILE_DIR", "").strip()
    if not folder or not is_main:
        return None
    return StepProfiler(Path(folder), stage, device, steps=max(_whole("CITI_PROFILE_STEPS", 3), 1),
                        skip=max(_whole("CITI_PROFILE_SKIP", 2), 0))


def _whole(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:  # a diagnostic's typo must not fail the job: say so and use the default
        log.warning("%s=%r is not a whole number: using %d", name, value, default)
        return default
