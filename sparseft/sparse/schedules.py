"""Sparsity schedules: the target sparsity as a pure function of the optimizer step.

Steps count optimizer steps from 0 (Lightning's ``trainer.global_step``) and ``total_steps``
is the length of training in optimizer steps. Warm-ups are fractions of ``total_steps``:

* ``initial_warmup``: dense (sparsity 0) before ``t0 = initial_warmup * total_steps``;
* ``final_warmup``: the final sparsity is held for the last ``final_warmup * total_steps``
  steps, so the network recovers before training ends.

Pure functions make the schedule trivially resumable: a resumed run recomputes the same
value from the restored step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sparseft.sparse.masks import check_sparsity

ScheduleKind = Literal["cubic", "linear", "constant", "one_shot"]


def _ramp_progress(
    step: int, total_steps: int, initial_warmup: float, final_warmup: float, update_every: int
) -> float | None:
    """Progress in [0, 1] along the ramp, or None before it starts.

    The step is first rounded down to the last mask update (``t0 + k * update_every``).
    """
    start = initial_warmup * total_steps
    end = (1.0 - final_warmup) * total_steps
    if step < start:
        return None
    if end <= start:
        return 1.0
    step = start + math.floor((step - start) / update_every) * update_every
    return min(1.0, (step - start) / (end - start))


def cubic_sparsity(
    step: int,
    total_steps: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    initial_warmup: float = 0.0,
    final_warmup: float = 0.0,
    update_every: int = 1,
) -> float:
    """Gradual pruning of Zhu & Gupta (2017), eq. 1.

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3   for t0 <= t <= t0 + n * dt,

    with ``t0 = initial_warmup * T`` and ``t0 + n * dt = (1 - final_warmup) * T``: fast
    pruning early, when many weights are redundant, and slow pruning near the end.
    """
    progress = _ramp_progress(step, total_steps, initial_warmup, final_warmup, update_every)
    if progress is None:
        return 0.0
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def linear_sparsity(
    step: int,
    total_steps: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    initial_warmup: float = 0.0,
    final_warmup: float = 0.0,
    update_every: int = 1,
) -> float:
    """Sparsity rising linearly from ``initial_sparsity`` at t0 to ``final_sparsity``."""
    progress = _ramp_progress(step, total_steps, initial_warmup, final_warmup, update_every)
    if progress is None:
        return 0.0
    return initial_sparsity + (final_sparsity - initial_sparsity) * progress


def constant_sparsity(step: int, total_steps: int, final_sparsity: float) -> float:
    """The final sparsity from the first step (static masks, e.g. sparse pre-training)."""
    return final_sparsity


def one_shot_sparsity(step: int, total_steps: int, final_sparsity: float, initial_warmup: float = 0.0) -> float:
    """Dense until ``initial_warmup * total_steps``, then the final sparsity at once."""
    return final_sparsity if step >= initial_warmup * total_steps else 0.0


@dataclass(frozen=True)
class SparsitySchedule:
    """How sparsity grows during training (the final value belongs to the strategy).

    Args:
        kind: ``cubic`` (Zhu & Gupta), ``linear``, ``constant`` (final sparsity from step 0)
            or ``one_shot`` (dense, then final at ``initial_warmup``).
        initial_sparsity: sparsity at the start of the ramp (cubic and linear).
        initial_warmup: fraction of training kept dense before pruning starts (default 0.1).
        final_warmup: fraction of training at the end that keeps the final sparsity, so the
            network recovers from the last pruning step (default 0.3).
        update_every: masks change only every this many optimizer steps (Zhu & Gupta's dt).
    """

    kind: ScheduleKind = "cubic"
    initial_sparsity: float = 0.0
    initial_warmup: float = 0.1
    final_warmup: float = 0.3
    update_every: int = 1

    def __post_init__(self) -> None:
        check_sparsity(self.initial_sparsity)
        if self.kind not in ("cubic", "linear", "constant", "one_shot"):
            raise ValueError(f"unknown schedule kind {self.kind!r}; use cubic, linear, constant or one_shot")
        for name in ("initial_warmup", "final_warmup"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} is a fraction of training in [0, 1), got {getattr(self, name)}")
        if self.kind in ("cubic", "linear") and self.initial_warmup + self.final_warmup >= 1.0:
            raise ValueError(
                f"initial_warmup + final_warmup = {self.initial_warmup + self.final_warmup} leaves no steps "
                "to prune in; their sum must be below 1"
            )
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")

    def __call__(self, step: int, total_steps: int, final_sparsity: float) -> float:
        """Target sparsity at optimizer step ``step`` of ``total_steps``."""
        if self.kind == "constant":
            return constant_sparsity(step, total_steps, final_sparsity)
        if self.kind == "one_shot":
            return one_shot_sparsity(step, total_steps, final_sparsity, self.initial_warmup)
        ramp = cubic_sparsity if self.kind == "cubic" else linear_sparsity
        return ramp(
            step, total_steps, final_sparsity, self.initial_sparsity,
            self.initial_warmup, self.final_warmup, self.update_every,
        )
