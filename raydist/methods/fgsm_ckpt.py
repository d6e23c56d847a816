"""FGSM with checkpoints (Kim, Lee & Lee, "Understanding catastrophic overfitting in single-step
adversarial training", AAAI 2021; reference trainer in Harry24k's code).

A full-size FGSM step can jump past the decision boundary into a region the model then learns
to fit (catastrophic overfitting).  So each sample trains on the *smallest* step along its FGSM
perturbation δ that is already misclassified: the checkpoints x + (i/c)·δ, i = 1..c−1, are
classified (inference only, eval mode, as in the reference), the first misclassified one is
used, and the full step x + δ when none is.  As in the reference, a sample the model already
misclassifies at the FGSM starting point (read off the FGSM pass itself, at no extra cost)
trains on the clean x.  δ is the FGSM-RS perturbation (uniform start, α = 1.25ε) with c = 3.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from raydist.attacks.core import eval_mode, project_linf, uniform_noise
from raydist.methods.base import TrainMethod


def first_misclassified(wrong: Tensor) -> Tensor:
    """Per sample (column), the index of the first row of the (K, B) bool ``wrong`` that is True,
    or K where none is.  Device-side, no host sync."""
    k = wrong.shape[0]
    index = torch.full(wrong.shape[1:], k, dtype=torch.long, device=wrong.device)
    for i in range(k - 1, -1, -1):
        index = torch.where(wrong[i], torch.full_like(index, i), index)
    return index


class FGSMCKPT(TrainMethod):
    """Train each sample on the first misclassified checkpoint along its FGSM perturbation."""

    name = "fgsm_ckpt"
    PARAMS = {"c": 3, "alpha": None, "random_start": True}

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        c: int = 3,
        alpha: float | None = None,
        random_start: bool = True,
        **common: Any,
    ) -> None:
        # common: epsilon, label_smoothing, autocast (see TrainMethod)
        super().__init__(model, optimizer, **common)
        if c < 1:
            raise ValueError(f"c must be >= 1, got {c}")
        self.c = int(c)
        self.alpha = float(alpha) if alpha is not None else 1.25 * self.epsilon
        self.random_start = bool(random_start)

    def _fgsm(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The FGSM(-RS) perturbation δ (box-clipped, so every checkpoint is in [0, 1]) and whether
        each sample is misclassified at the starting point, from the same forward pass."""
        x0 = torch.clamp(x + uniform_noise(x, self.epsilon), 0.0, 1.0) if self.random_start else x
        x0 = x0.detach().requires_grad_(True)
        with torch.enable_grad():
            with self.autocast():
                logits = self.attack_model(x0)
            value = F.cross_entropy(logits.float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(value, x0)
        delta = project_linf(x0.detach() + self.alpha * grad.sign(), x, self.epsilon) - x
        return delta, logits.detach().argmax(1) != y

    def checkpoint_example(
        self, x: Tensor, y: Tensor, delta: Tensor, start_wrong: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per sample, x + (i/c)·δ for the first misclassified checkpoint i in 1..c−1, else the
        full step x + δ (i = c); i = 0 (the clean x) where ``start_wrong`` is True.  Returns the
        example and i.  Checkpoints are classified by the inner module in eval mode, no grad."""
        x, delta = x.detach(), delta.detach()
        if start_wrong is None:
            start_wrong = torch.zeros_like(y, dtype=torch.bool)
        wrong = [start_wrong]
        with torch.no_grad(), eval_mode(self.attack_model):
            for i in range(1, self.c):
                with self.autocast():
                    logits = self.attack_model(x + (i / self.c) * delta)
                wrong.append(logits.argmax(1) != y)
        index = first_misclassified(torch.stack(wrong))
        scale = (index.to(x.dtype) / self.c).view(-1, *([1] * (x.dim() - 1)))
        return torch.clamp(x + scale * delta, 0.0, 1.0), index

    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        self._train_mode()
        x = x.detach()
        delta, start_wrong = self._fgsm(x, y)
        return self.checkpoint_example(x, y, delta, start_wrong)[0]
