"""Attacks on a small model trained on a learnable synthetic problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydist.attacks import ATTACKS, fgsm, get_attack, input_gradient, pgd, pgd_perturb, project_linf, run_attack
from raydist.models import create_model

EPS = 8 / 255
CLASSES = 4


def synthetic(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = a fixed smooth colour pattern, plus pixel noise: learnable in a few dozen steps."""
    templates = F.interpolate(
        torch.rand(CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=size, mode="bilinear"
    )
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = (0.25 + 0.5 * templates[y] + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=CLASSES, width=8)
    x, y = synthetic(256, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(64, seed=2)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction=reduction)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def assert_valid(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


# the strong attacks at budgets a 2-core CPU runs in seconds (their full budgets: tests/test_attacks_strong.py)
SMALL: dict[str, dict] = {
    "apgd-ce": {"n_iter": 10},
    "apgd-dlr": {"n_iter": 10},
    "apgd-t": {"n_iter": 10, "n_target_classes": 2},
    "fab-t": {"n_iter": 10, "n_target_classes": 2},
    "square": {"n_queries": 100},
    "aa": {"n_iter": 10, "n_target_classes": 2, "fab_n_iter": 10, "n_queries": 50},
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_stay_in_the_ball_and_box(trained, batch, name):
    x, y = batch
    x_adv = run_attack(name, trained, x, y, EPS, seed=0, **SMALL.get(name, {}))
    assert_valid(x_adv, x, EPS)
    if name != "clean":
        assert (x_adv != x).any()


def test_attacks_on_the_edge_of_the_box(trained):
    x = torch.zeros(4, 3, 16, 16)
    x[:2] = 1.0
    y = torch.arange(4) % CLASSES
    for x_adv in (fgsm(trained, x, y, EPS, random_start=True, seed=1), pgd(trained, x, y, EPS, EPS / 4, 3)):
        assert_valid(x_adv, x, EPS)
    assert torch.equal(pgd(trained, x, y, 0.0, 0.0, 3), x)


def test_model_mode_and_state_are_restored(trained, batch):
    x, y = batch
    trained.train()
    frozen_bn = trained.net.bn1
    frozen_bn.eval()  # a submodule deliberately in eval mode must stay so
    stats = frozen_bn.running_mean.clone(), trained.net.layer1[0].bn1.running_mean.clone()
    try:
        for name in ATTACKS:
            run_attack(name, trained, x, y, EPS, seed=0, **SMALL.get(name, {}))
            assert trained.training and trained.net.layer1.training and not frozen_bn.training
        # attacks ran in eval mode: BatchNorm statistics untouched, no weight gradients left
        assert torch.equal(stats[0], frozen_bn.running_mean)
        assert torch.equal(stats[1], trained.net.layer1[0].bn1.running_mean)
        assert all(p.grad is None for p in trained.parameters())
    finally:
        trained.eval()


def test_pgd_is_stronger_than_fgsm_on_a_trained_model(trained, batch):
    x, y = batch
    clean_acc = accuracy(trained, x, y)
    assert clean_acc >= 0.9, "the fixture model should have learned the task"
    x_fgsm = run_attack("fgsm", trained, x, y, EPS, seed=0)
    x_pgd = run_attack("pgd10", trained, x, y, EPS, seed=0)
    assert loss_of(trained, x_pgd, y) > loss_of(trained, x_fgsm, y) > loss_of(trained, x, y)
    assert accuracy(trained, x_pgd, y) <= accuracy(trained, x_fgsm, y) <= clean_acc
    assert accuracy(trained, x_pgd, y) < clean_acc


def test_pgd_n_names(trained, batch):
    x, y = batch
    assert torch.equal(run_attack("pgd3", trained, x, y, EPS, seed=4), pgd(trained, x, y, EPS, EPS / 4, 3, seed=4))
    assert torch.equal(run_attack("pgd10", trained, x, y, EPS, seed=4), pgd(trained, x, y, EPS, EPS / 4, 10, seed=4))


def test_more_pgd_steps_never_lower_the_loss_on_average(trained, batch):
    x, y = batch
    losses = [loss_of(trained, pgd(trained, x, y, EPS, EPS / 4, s, seed=3), y).item() for s in (1, 5, 20)]
    assert losses[0] <= losses[1] <= losses[2] + 1e-4


def test_restarts_keep_the_worst_case_per_sample(trained, batch):
    x, y = batch
    one = pgd(trained, x, y, EPS, EPS / 8, 3, restarts=1, seed=5)
    three = pgd(trained, x, y, EPS, EPS / 8, 3, restarts=3, seed=5)  # its first restart is `one`
    assert_valid(three, x, EPS)
    with torch.no_grad():
        l1, l3 = trained(one), trained(three)
    wrong1, wrong3 = l1.argmax(1) != y, l3.argmax(1) != y
    assert (wrong3 | ~wrong1).all(), "a sample broken by restart 1 must stay broken"
    same = wrong1 == wrong3
    ce1 = F.cross_entropy(l1, y, reduction="none")
    ce3 = F.cross_entropy(l3, y, reduction="none")
    assert (ce3[same] >= ce1[same] - 1e-5).all()


def test_seed_makes_attacks_deterministic_without_touching_global_rng(trained, batch):
    x, y = batch
    state = torch.get_rng_state()
    a = pgd(trained, x, y, EPS, EPS / 4, 2, seed=7)
    b = pgd(trained, x, y, EPS, EPS / 4, 2, seed=7)
    c = pgd(trained, x, y, EPS, EPS / 4, 2, seed=8)
    f1 = fgsm(trained, x, y, EPS, random_start=True, seed=7)
    f2 = fgsm(trained, x, y, EPS, random_start=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(f1, f2)


def test_input_gradient_leaves_model_alone(trained, batch):
    x, y = batch
    trained.train()
    try:
        with torch.no_grad():  # evaluators often call attacks under no_grad
            g = input_gradient(trained, x, y)
        assert trained.training
    finally:
        trained.eval()
    assert g.shape == x.shape and g.abs().sum() > 0
    assert all(p.grad is None for p in trained.parameters())
    assert not x.requires_grad
    # matches autograd on the summed cross-entropy (same mode: eval)
    g = input_gradient(trained, x, y)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(trained(xr), y, reduction="sum").backward()
    assert torch.allclose(g, xr.grad, atol=1e-6)
    trained.zero_grad(set_to_none=True)


def test_pgd_perturb_keeps_train_mode_and_uses_autocast(trained, batch):
    x, y = batch
    calls = []

    class Counting:
        def __enter__(self):
            calls.append(1)

        def __exit__(self, *exc):
            return False

    trained.train()
    try:
        x_adv = pgd_perturb(trained, x, y, EPS, EPS / 4, 3, autocast=Counting)
        assert trained.training
    finally:
        trained.eval()
    assert len(calls) == 3
    assert_valid(x_adv, x, EPS)


def test_project_linf():
    x = torch.full((1, 1, 2, 2), 0.5)
    x[0, 0, 0, 0] = 0.99
    out = project_linf(x + torch.tensor([[[[0.5, -0.5], [0.01, 0.0]]]]), x, 0.1)
    assert torch.allclose(out, torch.tensor([[[[1.0, 0.4], [0.51, 0.5]]]]))


def test_bad_arguments():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"unknown attack 'cw'.*pgd10"):
        run_attack("cw", model, x, y, EPS)
    for bad in ("pgd0", "pgd", "pgd-3", "pgd05"):
        with pytest.raises(ValueError, match="unknown attack"):
            get_attack(bad)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, EPS, EPS / 4, 2, norm="l1")
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -1.0)
