"""Learning-rate schedules, stepped once per optimizer update (not per epoch).

Each returns a multiplier of the peak learning rate for update ``t``. A schedule is written in the job's own
units (``optim.epochs``, milestones out of it) but lands on the *fraction of the run* it names, whatever epoch
axis a method trains on: Free-AT runs ``ceil(epochs / m)`` epochs of ``m`` updates per minibatch, and its
milestone "100 of 110" must still fall at 100/110 of its updates, as in the Free-AT reference (which decays on
its divided epoch axis) and in fast_adversarial's train_free.py (whose milestones are fractions of all updates).

Only the model's optimizer follows this schedule by default; a method's own optimizers (FGSM-SDI's generator)
keep their constant lr unless the method asks for the model's schedule (:meth:`TrainMethod.extra_optimizers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

# the papers' 110-epoch protocol: x0.1 at epoch 100 and again at 105
DEFAULT_MILESTONE_FRACTIONS = (100 / 110, 105 / 110)


def lr_multiplier(
    schedule: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    peak: float = 0.4,
    total_steps: int | None = None,
) -> Callable[[int], float]:
    """The multiplier of the peak lr at update ``t`` for the named schedule.

    ``epochs`` is the unit the milestones are given in (the job's ``optim.epochs``); ``total_steps`` is how many
    updates the run really makes (default ``epochs * steps_per_epoch``). Every point of a schedule is placed at
    its fraction of ``total_steps``: milestone ``m`` at update ``round(m / epochs * total_steps)``.

    multistep: ``gamma`` at each milestone (default: 100/110 and 105/110 of the run, the papers' choice, kept
    as two separate drops however short the run); cyclic: linear 0 -> 1 until ``peak`` of the run, then linear
    back to 0 (the fast-AT one-cycle schedule; GradAlign peaks at 0.4, Wong et al. and FGSM-SDI at 0.5);
    cosine: half a cosine from 1 to 0; constant: 1.
    """
    total = max(1, epochs * steps_per_epoch if total_steps is None else total_steps)
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "multistep":
        fractions = DEFAULT_MILESTONE_FRACTIONS if milestones is None else [m / epochs for m in milestones]
        points = sorted(round(f * total) for f in fractions)
        return lambda t: gamma ** sum(t >= p for p in points)
    if schedule == "cyclic":
        up = max(1.0, peak * total)
        down = max(1.0, total - up)
        return lambda t: t / up if t < up else max(0.0, (total - t) / down)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    raise ValueError(f"unknown schedule {schedule!r}")


def method_schedule(
    optim: dict[str, Any],
    batches_per_epoch: int,
    *,
    epoch_divisor: int = 1,
    updates_per_step: int = 1,
) -> tuple[int, Callable[[int], float]]:
    """(epochs the loop runs, lr multiplier per optimizer update) for the ``optim`` section of a job.

    A method that makes ``updates_per_step`` optimizer updates per minibatch and divides the epoch budget by
    ``epoch_divisor`` (Free-AT: both m) runs ``ceil(optim.epochs / epoch_divisor)`` epochs of
    ``batches_per_epoch * updates_per_step`` updates; the schedule spans exactly those updates.
    """
    epochs = max(1, math.ceil(optim["epochs"] / epoch_divisor))
    steps_per_epoch = batches_per_epoch * updates_per_step
    multiplier = lr_multiplier(optim["schedule"], epochs=optim["epochs"], steps_per_epoch=steps_per_epoch,
                               milestones=optim["milestones"], gamma=optim["gamma"], peak=optim["peak"],
                               total_steps=epochs * steps_per_epoch)
    return epochs, multiplier


def build_schedulers(
    optim: dict[str, Any], method: Any, optimizer: torch.optim.Optimizer, batches_per_epoch: int
) -> tuple[int, list[torch.optim.lr_scheduler.LambdaLR]]:
    """(epochs to run, one LambdaLR per optimizer that follows the job's schedule): the model's ``optimizer``
    and whatever ``method.extra_optimizers()`` returns. The loop steps each ``method.updates_per_step`` times
    per minibatch."""
    epochs, multiplier = method_schedule(optim, batches_per_epoch,
                                         epoch_divisor=getattr(method, "epoch_divisor", 1),
                                         updates_per_step=getattr(method, "updates_per_step", 1))
    return epochs, [torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
                    for opt in [optimizer, *method.extra_optimizers()]]
