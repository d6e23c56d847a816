"""Learning-rate schedules, stepped once per optimizer update (not per epoch).

Each returns a multiplier of the peak learning rate for update ``t`` so the same function drives the model's
optimizer and, where a method has one, its generator's optimizer (FGSM-SDI decays both at the same points).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def lr_multiplier(
    schedule: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    peak: float = 0.4,
) -> Callable[[int], float]:
    """The multiplier of the peak lr at update ``t`` for the named schedule.

    multistep: ``gamma`` at each milestone epoch (default 100/110 and 105/110 of the run, the papers' choice);
    cyclic: linear 0 -> 1 until ``peak`` of the run, then linear back to 0 (the fast-AT one-cycle schedule);
    cosine: half a cosine from 1 to 0; constant: 1.
    """
    total = max(1, epochs * steps_per_epoch)
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "multistep":
        if milestones is None:
            milestones = [round(epochs * 100 / 110), round(epochs * 105 / 110)]
        points = sorted(m * steps_per_epoch for m in milestones)
        return lambda t: gamma ** sum(t >= p for p in points)
    if schedule == "cyclic":
        up = max(1.0, peak * total)
        down = max(1.0, total - up)
        return lambda t: t / up if t < up else max(0.0, (total - t) / down)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    raise ValueError(f"unknown schedule {schedule!r}")
