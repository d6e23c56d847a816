"""Our attacks against an independent implementation (torchattacks, a test-only dependency) on a digits model.

Both sides attack the same adversarially trained digits CNN on the same 240 test images; robust accuracies must
agree within a few points (the attacks are randomised and differ in small details such as step-size schedules,
so exact equality is not expected; a broken attack is off by tens of points).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydist.attacks import run_attack
from raydist.data import load_dataset

torchattacks = pytest.importorskip("torchattacks")

EPS = 24 / 255


class Normalized(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    splits = load_dataset("digits")
    model = Normalized(splits.mean, splits.std)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_train = splits.train_x.float() / 255
    for epoch in range(8):  # FGSM-RS adversarial training: robust, but not completely
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            x, y = x_train[idx], splits.train_y[idx]
            x_adv = run_attack("fgsm", model, x, y, EPS, seed=epoch * 1000 + i, random_start=True, alpha=1.25 * EPS)
            loss = nn.functional.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    yield model, splits.test_x[:240].float() / 255, splits.test_y[:240]
    torch.set_num_threads(threads)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


CASES = {
    # name: (our attack and budget, the torchattacks equivalent, tolerance in accuracy)
    "pgd20": (("pgd20", {}), lambda m: torchattacks.PGD(m, eps=EPS, alpha=EPS / 4, steps=20, random_start=True), 0.03),
    "apgd-ce": (("apgd-ce", {"n_iter": 20}), lambda m: torchattacks.APGD(m, eps=EPS, steps=20, loss="ce"), 0.03),
    "apgd-dlr": (("apgd-dlr", {"n_iter": 20}), lambda m: torchattacks.APGD(m, eps=EPS, steps=20, loss="dlr"), 0.03),
    "apgd-t": (("apgd-t", {"n_iter": 10}), lambda m: torchattacks.APGDT(m, eps=EPS, steps=10, n_classes=10), 0.03),
    "fab-t": (("fab-t", {"n_iter": 10}),
              lambda m: torchattacks.FAB(m, eps=EPS, steps=10, n_classes=10, multi_targeted=True), 0.04),
    # AutoAttack's Square (its p schedule not rescaled to n_queries), as raydist's square runs by default
    "square": (("square", {"n_queries": 300}),
               lambda m: torchattacks.Square(m, eps=EPS, n_queries=300, resc_schedule=False), 0.04),
}


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_torchattacks(setup, name):
    model, x, y = setup
    (ours, budget), theirs, tol = CASES[name]
    clean = accuracy(model, x, y)
    mine = accuracy(model, run_attack(ours, model, x, y, EPS, seed=0, **budget), y)
    torch.manual_seed(0)
    ref = accuracy(model, theirs(model)(x, y), y)
    print(f"{name}: clean {clean:.3f} ours {mine:.3f} torchattacks {ref:.3f}")
    assert 0.2 < ref < clean - 0.1, "the model must be partly robust for the comparison to mean anything"
    assert abs(mine - ref) <= tol, f"{name}: ours {mine:.3f} vs torchattacks {ref:.3f}"
