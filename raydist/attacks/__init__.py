"""Attacks: plain functions on ``(model, x, y)`` with inputs in [0, 1].

``ATTACKS`` maps the names the evaluator and the job files use to callables
``fn(model, x, y, eps, seed=None, **budget) -> x_adv``; PGD uses step size eps/4 (2/255 at 8/255)
with a random start, the standard CIFAR evaluation setting.  ``run_attack`` also accepts
``pgdN`` and ``cwN`` for any N (e.g. a cheap ``pgd3`` for per-epoch validation), and ``pgdNxR``: N steps with R
random restarts, each sample keeping its worst (``pgd50x10``).  The strong
attacks default to their papers' budgets (``cw20``; ``apgd-ce``/``apgd-dlr`` 100 iterations;
``apgd-t`` 9 targets x 100; ``fab-t`` 9 targets x 100; ``square`` 5000 queries; ``aa`` all of
APGD-CE, APGD-T, FAB-T and Square); keyword arguments to ``run_attack`` reach the underlying
function, e.g. ``run_attack("apgd-ce", model, x, y, eps, seed=0, n_iter=20)``.  Nothing here
knows about Ray.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from raydist.attacks.apgd import apgd, apgd_targeted
from raydist.attacks.autoattack import autoattack, autoattack_details
from raydist.attacks.core import input_gradient, project_linf
from raydist.attacks.cw import cw
from raydist.attacks.fab import fab_targeted
from raydist.attacks.fgsm import fgsm, fgsm_perturb
from raydist.attacks.losses import ce_loss, dlr_loss, dlr_targeted_loss, margin_loss
from raydist.attacks.pgd import pgd, pgd_perturb, project_l2
from raydist.attacks.square import square

AttackFn = Callable[..., Tensor]


def _clean(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None) -> Tensor:
    return x.detach()


def _fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None, **kw: Any) -> Tensor:
    return fgsm(model, x, y, eps, seed=seed, **kw)


def _pgd_with(steps: int, restarts: int | None = None) -> AttackFn:
    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None, **kw: Any) -> Tensor:
        alpha = kw.pop("alpha", eps / 4)
        kw.setdefault("random_start", True)
        if restarts is not None:
            kw["restarts"] = restarts
        return pgd(model, x, y, eps, alpha, steps, seed=seed, **kw)

    attack.__name__ = f"pgd{steps}" + (f"x{restarts}" if restarts else "")
    attack.__doc__ = (f"PGD (L∞ unless norm='l2'), {steps} steps of eps/4 from a random start"
                      + (f", {restarts} restarts (each sample keeps its worst)" if restarts else "")
                      + "; kw go to pgd.")
    return attack


def _cw_with(steps: int) -> AttackFn:
    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None, **kw: Any) -> Tensor:
        return cw(model, x, y, eps, steps=steps, seed=seed, **kw)

    attack.__name__ = f"cw{steps}"
    attack.__doc__ = f"C&W: L∞ PGD on the margin loss, {steps} steps of eps/4 from a random start; kw go to cw."
    return attack


def _named(name: str, fn: Callable[..., Tensor], **fixed: Any) -> AttackFn:
    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None, **kw: Any) -> Tensor:
        return fn(model, x, y, eps, seed=seed, **fixed, **kw)

    attack.__name__ = name.replace("-", "_")
    attack.__doc__ = f"{name}: {fn.__name__}({', '.join(f'{k}={v!r}' for k, v in fixed.items())}); kw go to it."
    return attack


ATTACKS: dict[str, AttackFn] = {
    "clean": _clean,
    "fgsm": _fgsm,
    "pgd10": _pgd_with(10),
    "pgd20": _pgd_with(20),
    "pgd50": _pgd_with(50),
    "cw20": _cw_with(20),
    "apgd-ce": _named("apgd-ce", apgd, loss="ce"),
    "apgd-dlr": _named("apgd-dlr", apgd, loss="dlr"),
    "apgd-t": _named("apgd-t", apgd_targeted),
    "fab-t": _named("fab-t", fab_targeted),
    "square": _named("square", square),
    "aa": _named("aa", autoattack),
}


def get_attack(name: str) -> AttackFn:
    """The attack called ``name``: an ``ATTACKS`` entry, ``pgdN`` or ``cwN`` (N >= 1 steps of eps/4).

    Unknown names raise ValueError listing the choices."""
    if name in ATTACKS:
        return ATTACKS[name]
    match = re.fullmatch(r"(pgd|cw)([1-9][0-9]*)", name)
    if match:
        return (_pgd_with if match.group(1) == "pgd" else _cw_with)(int(match.group(2)))
    match = re.fullmatch(r"pgd([1-9][0-9]*)x([1-9][0-9]*)", name)
    if match:
        return _pgd_with(int(match.group(1)), int(match.group(2)))
    raise ValueError(f"unknown attack '{name}'; available: {', '.join(ATTACKS)} (or pgdN / cwN for N steps, "
                     "pgdNxR for R restarts)")


def run_attack(
    name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int | None = None, **kwargs: Any
) -> Tensor:
    """Run the attack called ``name`` (see :func:`get_attack`); ``kwargs`` go to the underlying
    function, e.g. smaller budgets (``n_iter=``, ``n_queries=``, ``restarts=``) or ``precision="bf16"``."""
    attack = get_attack(name)
    return attack(model, x, y, eps, seed=seed, **kwargs) if kwargs else attack(model, x, y, eps, seed=seed)


__all__ = [
    "ATTACKS",
    "apgd",
    "apgd_targeted",
    "autoattack",
    "autoattack_details",
    "ce_loss",
    "cw",
    "dlr_loss",
    "dlr_targeted_loss",
    "fab_targeted",
    "fgsm",
    "fgsm_perturb",
    "get_attack",
    "input_gradient",
    "margin_loss",
    "pgd",
    "pgd_perturb",
    "project_l2",
    "project_linf",
    "run_attack",
    "square",
]
