"""PGD adversarial training (Madry et al.): the robust-but-slow reference point.

CIFAR setting: ε = 8/255, step 2/255 (ε/4), 10 steps, random start; examples crafted with the
model in train mode, as in the paper's code.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from raydist.attacks.pgd import pgd_perturb
from raydist.methods.base import TrainMethod


class PGDAT(TrainMethod):
    """Train on the last PGD iterate."""

    name = "pgd_at"
    PARAMS = {"steps": 10, "alpha": None, "random_start": True}

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        steps: int = 10,
        alpha: float | None = None,
        random_start: bool = True,
        **common: Any,
    ) -> None:
        # common: epsilon, label_smoothing, autocast (see TrainMethod)
        super().__init__(model, optimizer, **common)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else self.epsilon / 4
        self.random_start = bool(random_start)

    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        self._train_mode()
        return pgd_perturb(
            self.attack_model, x, y, self.epsilon, self.alpha, self.steps, self.random_start, self.autocast
        )
