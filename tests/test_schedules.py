"""Learning-rate schedules land on the fraction of the run they name, on every method's epoch axis (Free-AT's
too), and only the model's optimizer follows them unless a method asks otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydist.config import validate
from raydist.methods import create_method
from raydist.train.schedules import build_schedulers, lr_multiplier, method_schedule

EPS = 8 / 255


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


def _optim(**changes) -> dict:
    return validate({"optim": changes})["optim"]


def _run(optim: dict, method, batches: int) -> tuple[int, list[float]]:
    """The lr of every optimizer update of a run, stepped exactly as train/loop.py steps its schedulers: the
    ``updates_per_step`` updates of one minibatch share the lr the minibatch starts at."""
    opt = method.optimizer
    epochs, schedulers = build_schedulers(optim, method, opt, batches)
    updates = getattr(method, "updates_per_step", 1)
    lrs = []
    for _ in range(epochs):
        for _ in range(batches):
            lrs += [opt.param_groups[0]["lr"]] * updates
            for _ in range(updates):
                for s in schedulers:
                    s.step()
    return epochs, lrs


def test_free_at_multistep_decays_at_the_fractions_it_names():
    """The FGSM-SDI protocol (110 epochs, x0.1 at 100 and 105) for Free-AT with m = 8: 14 epochs of 8 updates
    per minibatch. Before the fix the first drop sat at update 100 * 40 of a 560-update run: it never came."""
    m, batches, peak = 8, 5, 0.1
    model = _model()
    method = create_method("free_at", model, torch.optim.SGD(model.parameters(), lr=peak), epsilon=EPS, m=m)
    optim = _optim(epochs=110, schedule="multistep", milestones=[100, 105], lr=peak)
    epochs, lrs = _run(optim, method, batches)
    total = epochs * batches * m
    assert epochs == 14 and len(lrs) == total == 560
    assert lrs[-1] == pytest.approx(0.01 * peak)  # the run ends at 0.01x its peak lr
    first_drop = next(i for i, lr in enumerate(lrs) if lr < peak)
    second_drop = next(i for i, lr in enumerate(lrs) if lr < 0.05 * peak)
    assert abs(first_drop - 100 / 110 * total) <= m  # within the minibatch where the fraction falls
    assert abs(second_drop - 105 / 110 * total) <= m


def test_free_at_cyclic_peaks_at_its_fraction_and_ends_at_zero():
    m, batches = 4, 3
    model = _model()
    method = create_method("free_at", model, torch.optim.SGD(model.parameters(), lr=0.2), epsilon=EPS, m=m)
    epochs, lrs = _run(_optim(epochs=30, schedule="cyclic", peak=0.5, lr=0.2), method, batches)
    assert epochs == 8 and len(lrs) == 8 * 3 * 4
    top = max(range(len(lrs)), key=lrs.__getitem__)
    assert abs(top - 0.5 * len(lrs)) <= m and lrs[top] == pytest.approx(0.2, rel=0.1)
    assert lrs[-1] <= 0.2 * m / (0.5 * len(lrs)) + 1e-9  # the last minibatch starts m updates before 0


def test_default_milestones_of_a_short_run_are_two_drops():
    """15 epochs: the drops at 100/110 and 105/110 of the run stay two x0.1 drops (they used to collapse onto
    epoch 14 as one x0.01 drop)."""
    mult = lr_multiplier("multistep", epochs=15, steps_per_epoch=20)
    values = [mult(t) for t in range(300)]
    assert sorted(set(values), reverse=True) == pytest.approx([1.0, 0.1, 0.01])
    assert values.index(pytest.approx(0.1)) == round(300 * 100 / 110)
    assert values.index(pytest.approx(0.01)) == round(300 * 105 / 110)


def test_milestones_are_unchanged_for_one_update_per_minibatch():
    epochs, mult = method_schedule(_optim(epochs=110, schedule="multistep", milestones=[100, 105]), 10)
    assert epochs == 110
    assert mult(999) == 1.0 and mult(1000) == pytest.approx(0.1) and mult(1050) == pytest.approx(0.01)
