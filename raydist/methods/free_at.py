"""Free adversarial training (Shafahi et al., "Adversarial training for free!"; reference code
mahyarnajibi/FreeAdversarialTraining).

Each minibatch is replayed ``m`` times.  Every replay does one forward/backward on
x + δ that yields both the weight gradient (one optimizer step) and the input gradient, which
moves δ by α·sign(∇) (α = ε, as in the paper) and is clipped to [−ε, ε].  δ is never reset: it
carries over between replays *and* into the next minibatch, as in the paper's code, where one
batch-sized buffer is sliced to the current batch size (rows past a short batch keep their
values; a larger batch grows the buffer with zeros).

The loop calls :meth:`FreeAT.step` once per minibatch, and Free-AT takes ``m`` optimizer steps
inside it: ``updates_per_step`` tells the loop to step its lr schedulers ``m`` times, and
``epoch_divisor`` (``m`` with ``divide_epochs``) lets it divide the epoch count by ``m`` so the
total number of weight updates matches the paper's budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from raydist.attacks.core import input_gradient
from raydist.methods.base import TrainMethod


class FreeAT(TrainMethod):
    """Minibatch replay with a persistent perturbation, updated by the weight update's backward."""

    name = "free_at"
    PARAMS = {"m": 8, "alpha": None, "divide_epochs": True}

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        m: int = 8,
        alpha: float | None = None,
        divide_epochs: bool = True,
        **common: Any,
    ) -> None:
        # common: epsilon, label_smoothing, autocast (see TrainMethod)
        super().__init__(model, optimizer, **common)
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        if self.sat.attacker != self.sat.optimizer:
            raise ValueError("free_at takes the attack's and the weights' gradients from one backward pass, so "
                             "smooth_backward can only be 'none' or 'both'")
        self.m = int(m)
        self.alpha = float(alpha) if alpha is not None else self.epsilon
        self.divide_epochs = bool(divide_epochs)
        self.delta: Tensor | None = None  # the carried perturbation, batch-sized (None until the first batch)
        self.num_updates = 0  # optimizer steps taken: m per step() call (num_steps counts step() calls)

    # -- what the loop reads ----------------------------------------------------------------
    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per :meth:`step` call: the loop steps its lr schedulers this often."""
        return self.m

    @property
    def epoch_divisor(self) -> int:
        """The paper divides the epoch budget by m so the number of weight updates stays equal."""
        return self.m if self.divide_epochs else 1

    # -- the carried perturbation -------------------------------------------------------------
    def _carried_delta(self, x: Tensor, *, store: bool) -> Tensor:
        """δ for this batch: the first ``len(x)`` rows of the buffer (a view, when ``store``, so
        in-place updates persist).  A missing or mismatched buffer (other image shape) starts from
        zeros; a shorter buffer is extended with zero rows.  Shapes are host-side: no sync."""
        n = x.shape[0]
        if self.delta is not None and self.delta.shape[1:] == x.shape[1:]:
            delta = self.delta.to(device=x.device, dtype=x.dtype)
        else:
            delta = torch.zeros_like(x)[:0]
        if delta.shape[0] < n:
            delta = torch.cat([delta, torch.zeros_like(x[: n - delta.shape[0]])])
        if store:
            self.delta = delta
        return delta[:n]

    # -- the recipe -------------------------------------------------------------------------
    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        """The example the next replay would train on: x + δ after one free update of the
        carried δ (weights held fixed).  Reads δ, does not change it."""
        self._train_mode()
        x = x.detach()
        delta = self._carried_delta(x, store=False)
        with self.sat.attack():
            grad = input_gradient(self.attack_model, torch.clamp(x + delta, 0.0, 1.0), y, autocast=self.autocast)
        delta = torch.clamp(delta + self.alpha * grad.sign(), -self.epsilon, self.epsilon)
        return torch.clamp(x + delta, 0.0, 1.0).detach()

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``m`` replays of the batch, each one optimizer step and one δ update from the same
        backward pass.  Returns the last replay's (loss, logits), detached."""
        self._train_mode()
        x = x.detach()
        delta = self._carried_delta(x, store=True)  # a view into self.delta: updated in place
        for _ in range(self.m):
            d = delta.detach().clone().requires_grad_(True)
            self.optimizer.zero_grad(set_to_none=True)
            with self.sat.update():
                with self.autocast():
                    logits = self.model(torch.clamp(x + d, 0.0, 1.0))
                loss = self.loss(logits, y)
                loss.backward()  # weight gradients (all-reduced under DDP) and ∇δ in one pass
            with torch.no_grad():
                delta.add_(self.alpha * d.grad.sign()).clamp_(-self.epsilon, self.epsilon)
            self.optimizer.step()
            self.num_updates += 1
        self.num_steps += 1
        return loss.detach(), logits.detach()

    # -- extra state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "delta": None if self.delta is None else self.delta.detach().clone(),
            "num_steps": self.num_steps,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # δ is moved to the batch's device and dtype at the next step
        self.delta = None if state["delta"] is None else state["delta"].detach().clone()
        self.num_steps = int(state["num_steps"])
        self.num_updates = int(state["num_updates"])
