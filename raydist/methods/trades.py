"""TRADES (Zhang et al., "Theoretically principled trade-off between robustness and accuracy";
reference code yaodongyu/TRADES).

Loss = CE(f(x), y) + β·KL(f(x) ‖ f(x′)), the KL averaged over the batch (``batchmean``) with
gradients through both of its arguments, as in the reference.  x′ maximizes that KL by PGD:
start at x + 0.001·N(0, 1), 10 steps, each projected to the ε-ball and [0, 1].  As in
the reference code the attack runs with the model in eval mode; the loss in train mode.  β = 6
is the paper's CIFAR-10 setting.  The step defaults to the reference's CIFAR-10 ratio, 0.007 at ε = 0.031
(train_trades_cifar10.py: --step-size 0.007 --epsilon 0.031), i.e. 0.2258·ε (0.00708 at 8/255), not ε/4.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from raydist.attacks.core import eval_mode, input_gradient, project_linf
from raydist.methods.base import TrainMethod

# train_trades_cifar10.py's step size over its epsilon
REFERENCE_STEP_RATIO = 0.007 / 0.031


def _kl_sum(logits: Tensor, target_log_probs: Tensor) -> Tensor:
    # Summed, like the attacks' CE: each sample's input gradient is independent of the batch size.
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target_log_probs, reduction="sum", log_target=True)


def trades_terms(
    logits_nat: Tensor, logits_adv: Tensor, y: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(natural, robust): CE(f(x), y) with label smoothing, and KL(softmax f(x) ‖ softmax f(x′))
    averaged over the batch; both in fp32, differentiable in both logits."""
    natural = F.cross_entropy(logits_nat.float(), y, label_smoothing=label_smoothing)
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.log_softmax(logits_nat.float(), dim=1),
                      reduction="batchmean", log_target=True)
    return natural, robust


class TRADES(TrainMethod):
    """Clean cross-entropy plus β times the KL to the prediction on a KL-maximizing x′."""

    name = "trades"
    PARAMS = {"beta": 6.0, "steps": 10, "alpha": None}

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        beta: float = 6.0,
        steps: int = 10,
        alpha: float | None = None,
        **common: Any,
    ) -> None:
        # common: epsilon, label_smoothing, autocast (see TrainMethod)
        super().__init__(model, optimizer, **common)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.beta = float(beta)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else REFERENCE_STEP_RATIO * self.epsilon

    # -- the example ------------------------------------------------------------------------
    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        """x′: PGD on KL(f(x) ‖ f(·)) from x + 0.001·N(0, 1), the inner module in eval mode."""
        self._train_mode()
        x = x.detach()
        with eval_mode(self.attack_model):
            with torch.no_grad(), self.autocast():
                target = F.log_softmax(self.attack_model(x).float(), dim=1)
            # the start is projected too, so even steps=0 stays in the ε-ball and the box
            x_adv = project_linf(x + 0.001 * torch.randn_like(x), x, self.epsilon)
            for _ in range(self.steps):
                grad = input_gradient(self.attack_model, x_adv, target, loss=_kl_sum, autocast=self.autocast)
                x_adv = project_linf(x_adv + self.alpha * grad.sign(), x, self.epsilon)
        return x_adv.detach()

    # -- the loss ---------------------------------------------------------------------------
    def loss_terms(self, logits_nat: Tensor, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, natural, robust) with loss = natural + β·robust; see :func:`trades_terms`."""
        natural, robust = trades_terms(logits_nat, logits_adv, y, self.label_smoothing)
        return natural + self.beta * robust, natural, robust

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step on the TRADES loss.  Returns (loss, logits on x′), detached."""
        self._train_mode()
        x = x.detach()
        with self.sat.attack():
            x_adv = self.training_example(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self.sat.update():
            with self.autocast():  # two forwards of the wrapped model (as the reference), one backward
                logits_nat = self.model(x)
                logits_adv = self.model(x_adv)
            loss, _, _ = self.loss_terms(logits_nat, logits_adv, y)
            loss.backward()
        self.optimizer.step()
        self.num_steps += 1
        return loss.detach(), logits_adv.detach()
