"""AutoAttack, "standard" version (Croce & Hein, ICML 2020), L∞: APGD-CE, then APGD-T, then FAB-T, then
Square, each run only on the points that every earlier attack left correctly classified.

Each component gets a fresh local RNG seeded with the same ``seed`` and draws its random numbers for
the whole batch, so on a given point it does exactly what it would do run alone with that seed: the
ensemble's robust accuracy is at most that of each of its parts on the same points and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from raydist.attacks.apgd import apgd_attack
from raydist.attacks.core import check_eps, eval_mode, full_precision, make_generator
from raydist.attacks.fab import fab_attack
from raydist.attacks.losses import autocast_for, forward
from raydist.attacks.square import square_attack

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


def autoattack_details(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    attacks: Sequence[str] = STANDARD,
    n_iter: int = 100,
    n_target_classes: int = 9,
    fab_n_iter: int = 100,
    n_queries: int = 5000,
    seed: int | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the ``attacks`` in order on the points still robust; returns (x_adv, robust_after) where
    ``robust_after[name]`` is the boolean mask of points still correctly classified after ``name``
    (``"clean"`` first).  Budgets: ``n_iter`` APGD iterations (per target for APGD-T), ``n_target_classes``
    for APGD-T and FAB-T, ``fab_n_iter`` FAB iterations per target, ``n_queries`` Square queries."""
    check_eps(eps)
    unknown = [a for a in attacks if a not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown AutoAttack component(s) {unknown}; available: {', '.join(COMPONENTS)}")
    with eval_mode(model), full_precision(x.device):
        autocast = autocast_for(precision, x.device)
        x_adv = x.detach().clone()
        robust = forward(model, x, autocast).argmax(1) == y
        log = {"clean": robust.clone()}
        runners: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
            "apgd-ce": lambda **kw: apgd_attack(loss="ce", n_iter=n_iter, **kw),
            "apgd-dlr": lambda **kw: apgd_attack(loss="dlr", n_iter=n_iter, **kw),
            "apgd-t": lambda **kw: apgd_attack(n_iter=n_iter, n_target_classes=n_target_classes, **kw),
            "fab-t": lambda **kw: fab_attack(n_iter=fab_n_iter, n_target_classes=n_target_classes, **kw),
            # AutoAttack runs Square with resc_schedule=False: the p schedule of 10 000 queries, cut at n_queries
            "square": lambda **kw: square_attack(n_queries=n_queries, rescale_schedule=False, **kw),
        }
        for name in attacks:
            x_adv, _ = runners[name](model=model, x=x, y=y, eps=eps, robust=robust, x_adv=x_adv,
                                     generator=make_generator(seed, x.device), autocast=autocast)
            robust = robust & (forward(model, x_adv, autocast).argmax(1) == y)
            log[name] = robust.clone()
        return x_adv, log


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    attacks: Sequence[str] = STANDARD,
    n_iter: int = 100,
    n_target_classes: int = 9,
    fab_n_iter: int = 100,
    n_queries: int = 5000,
    seed: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) under L∞; returns the detached adversarial
    batch, in the eps-ball and the box.  See :func:`autoattack_details` for the budgets."""
    x_adv, _ = autoattack_details(model, x, y, eps, attacks=attacks, n_iter=n_iter, n_target_classes=n_target_classes,
                                  fab_n_iter=fab_n_iter, n_queries=n_queries, seed=seed, precision=precision)
    return x_adv
