"""FGSM with random start (Wong et al., "Fast is better than free").

δ₀ ~ U(−ε, ε), one FGSM step of α = 1.25ε, projected to [−ε, ε] and the image box.  Cheap,
but prone to catastrophic overfitting in long runs — the failure FGSM-SDI addresses.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from raydist.attacks.fgsm import fgsm_perturb
from raydist.methods.base import TrainMethod


class FGSMRS(TrainMethod):
    """Train on one FGSM step taken from a uniform random point in the ε-ball."""

    name = "fgsm_rs"
    PARAMS = {"alpha": None}

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        alpha: float | None = None,
        **common: Any,
    ) -> None:
        # common: epsilon, label_smoothing, autocast (see TrainMethod)
        super().__init__(model, optimizer, **common)
        self.alpha = float(alpha) if alpha is not None else 1.25 * self.epsilon

    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        self._train_mode()
        return fgsm_perturb(
            self.attack_model, x, y, self.epsilon, self.alpha, random_start=True, autocast=self.autocast
        )
