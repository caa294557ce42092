"""Sparsity schedules: a target value as a pure function of the optimizer step.

Steps count optimizer steps from 0 (Lightning's ``trainer.global_step``); ``total_steps`` is
the length of training in optimizer steps. A schedule has a *window* ``[t0, t1]``:

* before ``t0`` (the initial warm-up) a ramp holds its initial value (``initial_sparsity``, 0 by
  default: dense), as PST's reference ``schedule_sparsity_ratio`` does; ``one_shot`` is dense;
* between ``t0`` and ``t1`` the value ramps from its initial to its final value;
* after ``t1`` (the final warm-up, ``total_steps - t1`` steps) the final value holds, so the
  network recovers from the last pruning step.

Warm-ups are given as fractions of ``total_steps`` (the default), as optimizer steps, or as
multiples of the learning-rate warm-up (movement pruning's convention). Pure functions make a
schedule trivially resumable: a resumed run recomputes the same value from the restored step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sparseft.sparse.masks import check_sparsity

ScheduleKind = Literal["cubic", "linear", "constant", "one_shot"]
WarmupUnit = Literal["fraction", "steps", "lr_warmup"]


def ramp_progress(step: int, start: float, end: float, update_every: int = 1) -> float | None:
    """Progress ``(t − t0) / (t1 − t0)`` in [0, 1], or None before ``t0``.

    ``t0`` and ``t1`` need not be whole steps (warm-ups of 0.1·T): the progress is taken at the
    step itself, as the references' schedules do (PST's ``schedule_sparsity_ratio``, emmental's
    ``schedule_threshold``; with T = 25, step 3 is 0.5 of a step into a ramp starting at 2.5).
    With ``update_every > 1`` the step is first rounded down to the last update, the whole steps
    ``ceil(t0) + k·update_every``.
    """
    if step < start:
        return None
    if end <= start:
        return 1.0
    first = math.ceil(start)
    if step >= first:
        step = first + (step - first) // update_every * update_every
    return min(1.0, (step - start) / (end - start))


def cubic_ramp(progress: float) -> float:
    """Zhu & Gupta (2017), eq. 1, as a fraction of the way from initial to final value.

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3  <=>  s_t = s_i + (s_f - s_i) * (1 - (1 - p)^3):
    fast early, when many weights are redundant, slow near the end. Movement pruning's
    threshold schedule is the same curve on the fraction of weights kept.
    """
    return 1.0 - (1.0 - progress) ** 3


def linear_ramp(progress: float) -> float:
    return progress


def remaining_fraction(kind: str, progress: float) -> float:
    """``1 − shaped progress``, computed as the references do: ``(1 − p)³`` for the cubic ramp,
    so ``s_t = s_f + (s_i − s_f)·(1 − p)³`` is their expression term for term."""
    return (1.0 - progress) ** 3 if kind == "cubic" else 1.0 - progress


@dataclass(frozen=True)
class SparsitySchedule:
    """How sparsity (or a pruning threshold) moves during training.

    Args:
        kind: ``cubic`` (Zhu & Gupta; movement pruning), ``linear``, ``constant`` (final value
            from step 0) or ``one_shot`` (dense, then the final value at the initial warm-up).
        initial_sparsity: sparsity at the start of the ramp (cubic and linear).
        initial_warmup: length of the dense start (default 0.1, in ``warmup_unit``).
        final_warmup: length of the end at the final value (default 0.3, in ``warmup_unit``).
        update_every: masks change only every this many optimizer steps (Zhu & Gupta's dt).
        warmup_unit: ``fraction`` of all optimizer steps, optimizer ``steps``, or multiples of
            the learning-rate warm-up (``lr_warmup``, as movement pruning's scripts count).
    """

    kind: ScheduleKind = "cubic"
    initial_sparsity: float = 0.0
    initial_warmup: float = 0.1
    final_warmup: float = 0.3
    update_every: int = 1
    warmup_unit: WarmupUnit = "fraction"

    def __post_init__(self) -> None:
        check_sparsity(self.initial_sparsity)
        if self.kind not in ("cubic", "linear", "constant", "one_shot"):
            raise ValueError(f"unknown schedule kind {self.kind!r}; use cubic, linear, constant or one_shot")
        if self.warmup_unit not in ("fraction", "steps", "lr_warmup"):
            raise ValueError(f"unknown warmup_unit {self.warmup_unit!r}; use fraction, steps or lr_warmup")
        for name in ("initial_warmup", "final_warmup"):
            value = getattr(self, name)
            if value < 0 or (self.warmup_unit == "fraction" and value >= 1.0):
                raise ValueError(f"{name} must be >= 0 (and < 1 as a fraction of training), got {value}")
        if self.warmup_unit == "fraction" and self.ramps and self.initial_warmup + self.final_warmup >= 1.0:
            raise ValueError(
                f"initial_warmup + final_warmup = {self.initial_warmup + self.final_warmup} leaves no steps "
                "to prune in; their sum must be below 1"
            )
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")

    @property
    def ramps(self) -> bool:
        return self.kind in ("cubic", "linear")

    def window(self, total_steps: int, lr_warmup_steps: int = 0) -> tuple[float, float]:
        """``(t0, t1)`` in optimizer steps.

        Raises:
            ValueError: the warm-ups do not fit in training (movement pruning's reference code
                silently never prunes then and evaluates with the final mask).
        """
        scale = {"fraction": total_steps, "steps": 1, "lr_warmup": lr_warmup_steps}[self.warmup_unit]
        start, end = self.initial_warmup * scale, total_steps - self.final_warmup * scale
        if self.ramps and end <= start:
            raise ValueError(
                f"the sparsity schedule has no steps to prune in: initial warm-up ends at step {start:g} and the "
                f"final warm-up starts at step {end:g} of {total_steps}. Train longer or shorten the warm-ups."
            )
        return start, end

    def fewest_steps_with_lr_warmup(self, warmup_ratio: float, limit: int = 10_000) -> int | None:
        """The fewest optimizer steps ``T`` whose learning-rate warm-up ``int(warmup_ratio · T)`` (the
        module's rounding) is at least one step and leaves the window room to prune in, for warm-ups
        counted in LR warm-ups; None when no ``T`` below ``limit`` does (``warmup_ratio`` 0, or warm-ups
        that together take all of training). A short run's error names it as the fix."""
        if warmup_ratio <= 0:
            return None
        for total in range(max(1, math.floor(1 / warmup_ratio)), limit):
            lr_warmup_steps = int(warmup_ratio * total)
            if lr_warmup_steps < 1:
                continue
            try:
                self.window(total, lr_warmup_steps)
            except ValueError:
                continue
            return total
        return None

    def raw_progress(self, step: int, total_steps: int, lr_warmup_steps: int = 0) -> float | None:
        """How far along the window ``step`` is, unshaped: None before it starts, then 0 to 1."""
        if self.kind == "constant":
            return 1.0
        start, end = self.window(total_steps, lr_warmup_steps)
        if self.kind == "one_shot":
            return 1.0 if step >= start else None
        return ramp_progress(step, start, end, self.update_every)

    def progress(self, step: int, total_steps: int, lr_warmup_steps: int = 0) -> float | None:
        """How far along the schedule ``step`` is: None before it starts, then 0 to 1 (shaped)."""
        raw = self.raw_progress(step, total_steps, lr_warmup_steps)
        if raw is None or not self.ramps:
            return raw
        return cubic_ramp(raw) if self.kind == "cubic" else linear_ramp(raw)

    def __call__(self, step: int, total_steps: int, final_sparsity: float, lr_warmup_steps: int = 0) -> float:
        """Target sparsity at optimizer step ``step`` of ``total_steps``: ``s_f + (s_i − s_f)·(1 − p)³``
        on the cubic ramp (Zhu & Gupta, eq. 1); before the window a ramp holds ``s_i`` (PST's reference:
        ``t ≤ w_i·T → s_i``), so ``initial_sparsity`` is not dropped during the initial warm-up, and
        ``one_shot`` is dense (0)."""
        raw = self.raw_progress(step, total_steps, lr_warmup_steps)
        if raw is None:
            return self.initial_sparsity if self.ramps else 0.0
        if raw == 1.0:
            return final_sparsity
        return final_sparsity + (self.initial_sparsity - final_sparsity) * remaining_fraction(self.kind, raw)
