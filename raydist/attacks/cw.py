"""The C&W attack of the adversarial-training papers: L∞ PGD on the Carlini & Wagner margin loss.

"CW-20" in Madry-style evaluations (TRADES, Rice et al., FGSM-SDI) is 20 steps of eps/4 from a
random start, maximizing max_{j != y} z_j - z_y; the margin is positive exactly when the sample is
misclassified, so the attack does not saturate the way cross-entropy does on confident models.
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.attacks.pgd import pgd


def cw(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 20,
    alpha: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    seed: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """CW-``steps``: PGD with step ``alpha`` (default eps/4) on the margin loss, in the L∞ ball.

    Same guarantees as :func:`raydist.attacks.pgd.pgd` (eval mode restored, seeded local RNG,
    worst case per sample over ``restarts``, result detached in the ball and the box)."""
    return pgd(
        model, x, y, eps, eps / 4 if alpha is None else alpha, steps,
        random_start=random_start, restarts=restarts, seed=seed, loss="margin", precision=precision,
    )
