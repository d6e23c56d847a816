"""Attacks: plain functions on ``(model, x, y)`` with inputs in [0, 1].

``ATTACKS`` maps the names the evaluator and the job files use to callables
``fn(model, x, y, eps, seed=None) -> x_adv``; PGD uses step size eps/4 (2/255 at 8/255)
with a random start, the standard CIFAR evaluation setting.  ``run_attack`` also accepts
``pgdN`` for any N (e.g. a cheap ``pgd3`` for per-epoch validation).  Nothing here knows
about Ray.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor, nn

from raydist.attacks.core import input_gradient, project_linf
from raydist.attacks.fgsm import fgsm, fgsm_perturb
from raydist.attacks.pgd import pgd, pgd_perturb

AttackFn = Callable[..., Tensor]


def _clean(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None) -> Tensor:
    return x.detach()


def _fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None) -> Tensor:
    return fgsm(model, x, y, eps, seed=seed)


def _pgd_with(steps: int) -> AttackFn:
    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None) -> Tensor:
        return pgd(model, x, y, eps, eps / 4, steps, random_start=True, seed=seed)

    attack.__name__ = f"pgd{steps}"
    attack.__doc__ = f"L∞ PGD, {steps} steps of eps/4 from a random start."
    return attack


ATTACKS: dict[str, AttackFn] = {
    "clean": _clean,
    "fgsm": _fgsm,
    "pgd10": _pgd_with(10),
    "pgd20": _pgd_with(20),
    "pgd50": _pgd_with(50),
}


def get_attack(name: str) -> AttackFn:
    """The attack called ``name``: an ``ATTACKS`` entry or ``pgdN`` (N >= 1 steps of eps/4).

    Unknown names raise ValueError listing the choices."""
    if name in ATTACKS:
        return ATTACKS[name]
    match = re.fullmatch(r"pgd([1-9][0-9]*)", name)
    if match:
        return _pgd_with(int(match.group(1)))
    raise ValueError(f"unknown attack '{name}'; available: {', '.join(ATTACKS)} (or pgdN for N steps)")


def run_attack(
    name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None
) -> Tensor:
    """Run the attack called ``name`` (see :func:`get_attack`)."""
    return get_attack(name)(model, x, y, eps, seed=seed)


__all__ = [
    "ATTACKS",
    "fgsm",
    "fgsm_perturb",
    "get_attack",
    "input_gradient",
    "pgd",
    "pgd_perturb",
    "project_linf",
    "run_attack",
]
