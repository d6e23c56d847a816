"""FGSM (Goodfellow et al.) and its random-start variant (Wong et al., FGSM-RS)."""

from __future__ import annotations

import torch
from torch import nn

from raydist.attacks.core import (
    AutocastFactory,
    check_eps,
    eval_mode,
    full_precision,
    input_gradient,
    make_generator,
    project_linf,
    uniform_noise,
)
from raydist.attacks.losses import autocast_for


def fgsm_perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    *,
    random_start: bool = False,
    autocast: AutocastFactory | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One signed-gradient step of size ``alpha`` from x (or from x + U(-eps, eps)), projected
    to the eps-ball and [0, 1].  Low level: leaves the model's mode alone so training methods
    can use it in train mode, as the papers do."""
    x = x.detach()
    x0 = x
    if random_start:
        x0 = torch.clamp(x + uniform_noise(x, eps, generator), 0.0, 1.0)
    grad = input_gradient(model, x0, y, autocast=autocast)
    return project_linf(x0 + alpha * grad.sign(), x, eps).detach()


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    random_start: bool = False,
    alpha: float | None = None,
    seed: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """FGSM for evaluation: eval mode (restored after), fp32 unless ``precision="bf16"``, detached result in
    the eps-ball.

    ``alpha`` defaults to ``eps`` (classic FGSM), or ``1.25 * eps`` with a random start
    (Wong et al.).  ``seed`` makes the random start reproducible without touching global RNG.
    """
    check_eps(eps)
    if alpha is None:
        alpha = 1.25 * eps if random_start else eps
    with eval_mode(model), full_precision(x.device):
        gen = make_generator(seed, x.device) if random_start else None
        return fgsm_perturb(model, x, y, eps, alpha, random_start=random_start, generator=gen,
                            autocast=autocast_for(precision, x.device))
