"""Projected gradient descent (Madry et al.) under the L∞ or the L2 norm, on any per-sample loss."""

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
from raydist.attacks.losses import PerSampleLoss, autocast_for, forward, get_loss, l2_norm, per_sample

NORMS = ("linf", "l2")


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale ``x_adv - x`` back into the L2 ball of radius ``eps``, then clamp into [0, 1].

    Clamping after the scaling keeps the point in the ball: x is in the box, so clamping only
    shrinks each coordinate of the perturbation."""
    delta = x_adv - x
    scale = torch.clamp(eps / (l2_norm(delta) + 1e-12), max=1.0)
    return torch.clamp(x + delta * per_sample(scale, x), 0.0, 1.0)


def uniform_l2_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise uniform in the L2 ball of radius ``eps``, one draw per sample (direction, then radius)."""
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / per_sample(l2_norm(direction) + 1e-12, x)
    u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    radius = eps * u ** (1.0 / x[0].numel())
    return direction * per_sample(radius, x)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}'; available: {', '.join(NORMS)}")


def pgd_perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    autocast: AutocastFactory | None = None,
    generator: torch.Generator | None = None,
    *,
    norm: str = "linf",
    loss: str | PerSampleLoss = "ce",
) -> torch.Tensor:
    """``steps`` ascent steps of size ``alpha`` on ``loss``, each projected to the eps-ball and [0, 1];
    returns the last iterate, detached.

    L∞: signed-gradient steps and a U(-eps, eps) start.  L2: steps along the normalized gradient
    and a start uniform in the L2 ball.  ``loss`` is ``ce`` (default), ``margin`` (C&W), ``dlr``
    or a per-sample callable ``(logits, y) -> losses``.

    Low level: the model's mode is left alone (PGD-AT runs it in train mode), and the forward
    passes run under ``autocast`` if given.  Random start from ``generator`` (global RNG if None).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    _check_norm(norm)
    x = x.detach()
    loss_fn = get_loss(loss)
    summed = "ce" if loss == "ce" else (lambda logits, t: loss_fn(logits, t).sum())
    if norm == "linf":
        x_adv = torch.clamp(x + uniform_noise(x, eps, generator), 0.0, 1.0) if random_start else x.clone()
        for _ in range(steps):
            grad = input_gradient(model, x_adv, y, loss=summed, autocast=autocast)
            x_adv = project_linf(x_adv + alpha * grad.sign(), x, eps)
    else:
        x_adv = torch.clamp(x + uniform_l2_noise(x, eps, generator), 0.0, 1.0) if random_start else x.clone()
        for _ in range(steps):
            grad = input_gradient(model, x_adv, y, loss=summed, autocast=autocast)
            step = grad / per_sample(l2_norm(grad) + 1e-12, grad)
            x_adv = project_l2(x_adv + alpha * step, x, eps)
    return x_adv.detach()


def _score(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: PerSampleLoss, autocast: AutocastFactory | None
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward(model, x_adv, autocast)
    return logits.argmax(1) != y, loss_fn(logits, y)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    random_start: bool = True,
    restarts: int = 1,
    seed: int | None = None,
    norm: str = "linf",
    loss: str | PerSampleLoss = "ce",
    precision: str = "fp32",
) -> torch.Tensor:
    """PGD for evaluation: eval mode (restored after), fp32 unless ``precision="bf16"``, detached
    result in the eps-ball (L∞ or L2, see :func:`pgd_perturb`) and the box.

    With several ``restarts`` each sample keeps its worst case: a restart that misclassifies
    it beats one that does not, and among equals the higher ``loss`` wins.  ``seed`` makes the
    random starts reproducible with a local RNG.
    """
    _check_norm(norm)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    check_eps(eps)
    loss_fn = get_loss(loss)
    with eval_mode(model), full_precision(x.device):
        autocast = autocast_for(precision, x.device)
        gen = make_generator(seed, x.device)

        def run() -> torch.Tensor:
            return pgd_perturb(
                model, x, y, eps, alpha, steps, random_start, autocast, gen, norm=norm, loss=loss
            )

        best = run()
        if restarts == 1:
            return best
        best_wrong, best_loss = _score(model, best, y, loss_fn, autocast)
        for _ in range(restarts - 1):
            cand = run()
            wrong, value = _score(model, cand, y, loss_fn, autocast)
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (value > best_loss))
            best = torch.where(per_sample(better, x), cand, best)
            best_wrong = best_wrong | wrong
            best_loss = torch.where(better, value, best_loss)
        return best
