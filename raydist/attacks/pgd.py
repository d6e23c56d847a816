"""Projected gradient descent (Madry et al.) under the L∞ norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
) -> torch.Tensor:
    """``steps`` signed-gradient ascent steps of size ``alpha``, each projected to the eps-ball
    and [0, 1]; returns the last iterate, detached.

    Low level: the model's mode is left alone (PGD-AT runs it in train mode), and the forward
    passes run under ``autocast`` if given.  Random start from ``generator`` (global RNG if None).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x = x.detach()
    x_adv = torch.clamp(x + uniform_noise(x, eps, generator), 0.0, 1.0) if random_start else x.clone()
    for _ in range(steps):
        grad = input_gradient(model, x_adv, y, autocast=autocast)
        x_adv = project_linf(x_adv + alpha * grad.sign(), x, eps)
    return x_adv.detach()


@torch.no_grad()
def _score(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x_adv).float()
    return logits.argmax(1) != y, F.cross_entropy(logits, y, reduction="none")


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
) -> torch.Tensor:
    """PGD for evaluation: eval mode (restored after), fp32, detached result in the eps-ball.

    With several ``restarts`` each sample keeps its worst case: a restart that misclassifies
    it beats one that does not, and among equals the higher loss wins.  ``seed`` makes the
    random starts reproducible with a local RNG.
    """
    if norm == "l2":
        raise NotImplementedError("PGD under the L2 norm is not implemented yet; use norm='linf'")
    if norm != "linf":
        raise ValueError(f"unknown norm '{norm}'; available: linf")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    check_eps(eps)
    with eval_mode(model), full_precision(x.device):
        gen = make_generator(seed, x.device)
        best = pgd_perturb(model, x, y, eps, alpha, steps, random_start, generator=gen)
        if restarts == 1:
            return best
        best_wrong, best_loss = _score(model, best, y)
        for _ in range(restarts - 1):
            cand = pgd_perturb(model, x, y, eps, alpha, steps, random_start, generator=gen)
            wrong, loss = _score(model, cand, y)
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_wrong = best_wrong | wrong
            best_loss = torch.where(better, loss, best_loss)
        return best
