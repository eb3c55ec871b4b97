"""Per-iteration schedules of the official MEC recipe, as closed-form functions of the step.

* learning rate: linear warm-up from 0 to ``base`` over the first ``warmup`` iterations (the
  official ``np.linspace(0, base, warmup)``, whose last point is ``base``), then a half cosine
  from ``base`` to ``final`` over the remaining iterations;
* teacher momentum: a half cosine from 0.996 to 1 over all iterations, no warm-up;
* ``1/lamda``: linear from ``factor/lamda`` to ``1/lamda`` over the warm-up (``np.linspace``
  again), then constant, so that the Taylor series converges while the network is young.

A value at step ``s`` depends on ``s`` alone, so a resumed run needs nothing but the step.

Extending a run (``--extend-epochs N``, restart at step ``r``): from ``r`` on, the values are those
of a run of ``N`` epochs, ``Schedules(total_steps=N * steps_per_epoch, ...).at(s)``, the cosines
recomputed for the new length as if it had been planned from step 0 (what timm's ``train.py``
does when resumed with more epochs). The alternative, a new cosine from the restart step's values
to the new end, would keep a finished run's lr at its final value (0) for the whole extension.
1/lamda does not depend on the length and is unchanged. Before ``r`` the run followed its
earlier length, which ``metrics.jsonl`` records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def linspace_value(step: int, num: int, start: float, stop: float) -> float:
    """``np.linspace(start, stop, num)[step]``."""
    if num == 1:
        return start
    return start + (stop - start) * step / (num - 1)


def half_cosine(step: int, num: int, start: float, stop: float) -> float:
    """``stop + (start - stop) * (1 + cos(pi * step / num)) / 2``: ``start`` at 0, near ``stop`` at ``num - 1``."""
    return stop + 0.5 * (start - stop) * (1.0 + math.cos(math.pi * step / num))


def warmup_cosine(step: int, total: int, warmup: int, base: float, final: float = 0.0, start: float = 0.0) -> float:
    """Linear ``start -> base`` over ``warmup`` steps, then cosine ``base -> final`` (official ``cosine_scheduler``)."""
    if step < warmup:
        return linspace_value(step, warmup, start, base)
    return half_cosine(step - warmup, total - warmup, base, final)


def warmup_constant(step: int, warmup: int, start: float, base: float) -> float:
    """Linear ``start -> base`` over ``warmup`` steps, then ``base`` (official ``lamda_scheduler``)."""
    if step < warmup:
        return linspace_value(step, warmup, start, base)
    return base


EXTENSION_RULE = (
    "from the restart step on, lr and teacher momentum follow the schedules of a run of the new length, "
    "recomputed as if it had been planned from step 0 (lr: the same warm-up, then a half cosine to 0 over the "
    "new total; teacher momentum: a half cosine to 1 over the new total); 1/lamda is unchanged"
)


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    teacher_momentum: float
    lamda_inv: float


@dataclass(frozen=True)
class Schedules:
    """All per-iteration values of a run. Lengths are in optimizer steps."""

    total_steps: int
    lr: float
    """Peak learning rate (already scaled by batch / 256)."""
    lr_warmup_steps: int
    lamda_inv: float
    """``1/lamda = m * eps^2 / d`` after the warm-up."""
    lamda_warmup_steps: int
    lamda_warmup_factor: float = 8.0
    teacher_momentum: float = 0.996
    final_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a run needs at least one step, got total_steps={self.total_steps}")
        for name in ("lr_warmup_steps", "lamda_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got {self.teacher_momentum}")

    def at(self, step: int) -> ScheduleValues:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the run's {self.total_steps} steps")
        return ScheduleValues(
            lr=warmup_cosine(step, self.total_steps, self.lr_warmup_steps, self.lr, self.final_lr),
            teacher_momentum=half_cosine(step, self.total_steps, self.teacher_momentum, 1.0),
            lamda_inv=warmup_constant(
                step, self.lamda_warmup_steps, self.lamda_warmup_factor * self.lamda_inv, self.lamda_inv
            ),
        )
