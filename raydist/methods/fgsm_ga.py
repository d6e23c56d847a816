"""FGSM with the GradAlign regularizer (Andriushchenko & Flammarion, "Understanding and improving
fast adversarial training"; reference code tml-epfl/understanding-fast-adv-training).

Catastrophic overfitting comes with the input gradient changing direction inside the ε-ball, so
the loss adds λ·(1 − cos(∇ₓℓ(x), ∇ₓℓ(x + η))), η ~ U(−ε, ε), the cosine taken per sample and
averaged over the samples whose two gradients are both non-zero.  Only the gradient at x + η is
differentiated (double backpropagation, ``create_graph=True``); the one at x is a constant, as in
the reference code, where it is the FGSM gradient itself.  Paper settings at ε = 8/255 on
CIFAR-10: FGSM from a zero start with α = 1.25ε (with a zero start the projection makes the step
ε), λ = 0.2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from raydist.attacks.core import input_gradient, project_linf, uniform_noise
from raydist.attacks.fgsm import fgsm_perturb
from raydist.methods.base import TrainMethod


def gradient_misalignment(g1: Tensor, g2: Tensor) -> Tensor:
    """1 − mean cosine between per-sample gradients ``g1[i]`` and ``g2[i]`` (0 when aligned, 1 when
    orthogonal, 2 when opposite).  Samples where either gradient is exactly zero are left out of
    the mean, as in the reference code; 0 if none is left.  No host sync."""
    g1, g2 = g1.flatten(1).float(), g2.flatten(1).float()
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    valid = (n1 > 0) & (n2 > 0)
    denom = torch.where(valid, n1 * n2, torch.ones_like(n1))  # keeps 0/0 out of forward and backward
    cos = (g1 * g2).sum(dim=1) / denom
    return ((1.0 - cos) * valid).sum() / valid.sum().clamp_min(1)


def _eager(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper: AOT-compiled graphs have no double backward."""
    return getattr(model, "_orig_mod", model)


class FGSMGA(TrainMethod):
    """Train on FGSM examples with λ·GradAlign added to the loss."""

    name = "fgsm_ga"
    PARAMS = {"grad_align_lambda": 0.2, "alpha": None, "random_start": False}

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        grad_align_lambda: float = 0.2,
        alpha: float | None = None,
        random_start: bool = False,
        **common: Any,
    ) -> None:
        # common: epsilon, label_smoothing, autocast (see TrainMethod)
        super().__init__(model, optimizer, **common)
        if grad_align_lambda < 0:
            raise ValueError(f"grad_align_lambda must be >= 0, got {grad_align_lambda}")
        self.grad_align_lambda = float(grad_align_lambda)
        self.alpha = float(alpha) if alpha is not None else 1.25 * self.epsilon
        self.random_start = bool(random_start)

    # -- the example ------------------------------------------------------------------------
    def _example_and_clean_grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """The FGSM example, and ∇ₓℓ(x) when it came for free (zero start), else None."""
        if self.random_start:
            return fgsm_perturb(self.attack_model, x, y, self.epsilon, self.alpha, random_start=True,
                                autocast=self.autocast), None
        grad = input_gradient(self.attack_model, x, y, autocast=self.autocast)
        return project_linf(x + self.alpha * grad.sign(), x, self.epsilon).detach(), grad

    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        self._train_mode()
        return self._example_and_clean_grad(x.detach(), y)[0]

    # -- the regularizer --------------------------------------------------------------------
    def grad_align(self, x: Tensor, y: Tensor, grad_x: Tensor | None = None) -> Tensor:
        """Unweighted GradAlign term 1 − mean cos(∇ₓℓ(x), ∇ₓℓ(x + η)), differentiable in the
        weights through the gradient at x + η.  ``grad_x``: ∇ₓℓ(x) if already computed."""
        x = x.detach()
        if grad_x is None:
            grad_x = input_gradient(self.attack_model, x, y, autocast=self.autocast)
        model = _eager(self.attack_model)
        x_eta = torch.clamp(x + uniform_noise(x, self.epsilon), 0.0, 1.0).requires_grad_(True)
        with torch.enable_grad():
            with self.autocast():
                logits = model(x_eta)
            value = F.cross_entropy(logits.float(), y, reduction="sum")
            (grad_eta,) = torch.autograd.grad(value, x_eta, create_graph=True)
        return gradient_misalignment(grad_x.detach(), grad_eta)

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step on CE(f(x_fgsm), y) + λ·GradAlign; returns that total loss."""
        self._train_mode()
        x = x.detach()
        with self.sat.attack():
            x_train, grad_x = self._example_and_clean_grad(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self.sat.update():
            with self.autocast():
                logits = self.model(x_train)
            loss = self.loss(logits, y)
            if self.grad_align_lambda > 0:
                # the regularizer's pass runs on the inner module; its weight gradient lands in the same
                # .grad leaves before DDP's per-parameter hooks fire, so it is all-reduced with the rest
                loss = loss + self.grad_align_lambda * self.grad_align(x, y, grad_x)
            loss.backward()
        self.optimizer.step()
        self.num_steps += 1
        return loss.detach(), logits.detach()
