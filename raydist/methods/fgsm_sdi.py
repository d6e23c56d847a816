"""FGSM-SDI (Jia et al., "Boosting fast adversarial training with learnable adversarial
initialization"; reference code jiaxiaojunQAQ/FGSM-SDI).

A light generator G proposes the FGSM starting point from the image and the sign of its
input gradient: g = sign ∇ₓCE(f(x), y), η = ε·G(x, g), and one FGSM step from x + η gives
the training example.  The target f and the generator play min-max: G *ascends* f's loss on
that example (gradient flowing through η; the FGSM sign term is a constant), updated once
every ``k`` target updates — k trades robustness against time.

As in the reference (FGSM_SDI.py): the generator (models/generator.py, its One_Layer_Attacker) sees the image
in [0, 1] (the reference normalises nothing: its utils.py has mean 0 and std 1); its Adam keeps lr 1e-3 for
the whole run (the reference's attacker scheduler is stepped once per generator update and so never reaches its
milestones, which are counted in target updates); the sign and the FGSM step use plain cross-entropy, the
weight update and the generator's ascent the (label-smoothed) training loss; the model is in train mode
(BatchNorm batch statistics) throughout, the generator in eval mode while it proposes the training example and
in train mode for its own update.
Deliberate deviations: the example is kept in the [0, 1] image box (x + η and the final x_adv are clamped), as
every raydist method and attack does, where the reference adds η and the step without clamping; and the target
model normalises its input with the dataset's statistics (every raydist model does), where the reference's sees
the raw [0, 1] image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Adam, Optimizer
from torch.profiler import record_function

from raydist.attacks.core import input_gradient
from raydist.methods.base import TrainMethod, fused_optimizer_kwargs
from raydist.models.generator import SDIGenerator


def _in_channels(model: nn.Module) -> int:
    """Image channels of ``model``: its ``in_channels`` attribute, else its first conv's."""
    channels = getattr(model, "in_channels", None)
    if isinstance(channels, int):
        return channels
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError("cannot infer the model's input channels for the FGSM-SDI generator")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _average_(tensors: Sequence[Tensor]) -> None:
    """All-reduce-average ``tensors`` in place across ranks, as one flat message."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


class FGSMSDI(TrainMethod):
    """FGSM from a learned initialization; the generator is updated every ``k`` target steps."""

    name = "fgsm_sdi"
    PARAMS = {"k": 20, "alpha": None, "generator_lr": 1e-3, "generator_weight_decay": 5e-4, "generator_width": 64,
              "generator_schedule": "constant"}
    GENERATOR_SCHEDULES = ("constant", "model")

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        k: int = 20,
        alpha: float | None = None,
        generator_lr: float = 1e-3,
        generator_weight_decay: float = 5e-4,
        generator_width: int = 64,
        generator_schedule: str = "constant",
        **common: Any,
    ) -> None:
        # common: epsilon, label_smoothing, autocast (see TrainMethod)
        super().__init__(model, optimizer, **common)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if generator_schedule not in self.GENERATOR_SCHEDULES:
            raise ValueError(f"generator_schedule must be one of {', '.join(self.GENERATOR_SCHEDULES)}, "
                             f"got {generator_schedule!r}")
        # constant: Adam at generator_lr for the whole run, as in the reference; model: the model's lr schedule
        self.generator_schedule = generator_schedule
        self.k = int(k)
        self.alpha = float(alpha) if alpha is not None else self.epsilon
        device = next(model.parameters()).device
        # the paper's generator has 64 hidden channels; small CPU models need a smaller one, or it costs
        # more than the model it attacks
        self.generator = SDIGenerator(_in_channels(self.attack_model), hidden=generator_width).to(device)
        if _distributed():  # every rank starts from rank 0's generator
            for t in [*self.generator.parameters(), *self.generator.buffers()]:
                dist.broadcast(t.data, src=0)
        params = list(self.generator.parameters())
        self.generator_optimizer = Adam(params, lr=generator_lr, weight_decay=generator_weight_decay,
                                        **fused_optimizer_kwargs(Adam, params))
        self.generator_steps = 0

    # -- the example ------------------------------------------------------------------------
    def _grad_sign(self, x: Tensor, y: Tensor) -> Tensor:
        return input_gradient(self.attack_model, x, y, autocast=self.autocast).sign()

    def _adversarial(self, x: Tensor, y: Tensor, grad_sign: Tensor) -> Tensor:
        """x + clamp(η + α·sign ∇CE(f(x+η)), −ε, ε) in [0, 1], differentiable in η (and so in G)."""
        with self.autocast():
            eta = self.epsilon * self.generator(x, grad_sign).float()
        x_init = torch.clamp(x + eta, 0.0, 1.0)
        step = self.alpha * input_gradient(self.attack_model, x_init, y, autocast=self.autocast).sign()
        delta = torch.clamp(eta + step, -self.epsilon, self.epsilon)
        return torch.clamp(x + delta, 0.0, 1.0)

    def _example(self, x: Tensor, y: Tensor, grad_sign: Tensor) -> Tensor:
        self.generator.eval()
        with torch.no_grad():  # no graph through G; input_gradient re-enables grad for itself
            return self._adversarial(x, y, grad_sign)

    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        self._train_mode()
        return self._example(x.detach(), y, self._grad_sign(x, y))

    def _step_example(self, x: Tensor, y: Tensor) -> Tensor:
        x = x.detach()
        grad_sign = self._grad_sign(x, y)  # the target has not moved yet: reuse for both
        if self.num_steps % self.k == 0:
            with record_function("raydist.generator"):
                self._update_generator(x, y, grad_sign)
        return self._example(x, y, grad_sign)

    # -- the generator's ascent step ----------------------------------------------------------
    def _update_generator(self, x: Tensor, y: Tensor, grad_sign: Tensor) -> None:
        """One Adam step of G on −loss(f(x_adv), y).  Gradients w.r.t. G's parameters only, so
        the target's ``.grad`` is untouched; averaged across ranks when distributed."""
        self.generator.train()
        x_adv = self._adversarial(x, y, grad_sign)
        with self.autocast():
            logits = self.attack_model(x_adv)
        params = [p for p in self.generator.parameters() if p.requires_grad]
        grads = list(torch.autograd.grad(-self.loss(logits, y), params))
        if _distributed():
            _average_(grads)
        for p, g in zip(params, grads):
            p.grad = g
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)
        if _distributed():  # keep BatchNorm running statistics identical on every rank
            _average_([b for b in self.generator.buffers() if b.is_floating_point()])
        self.generator.eval()
        self.generator_steps += 1

    # -- extra state ------------------------------------------------------------------------
    def extra_optimizers(self) -> list[Optimizer]:
        return [self.generator_optimizer] if self.generator_schedule == "model" else []

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "generator_steps": self.generator_steps,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.generator_steps = int(state["generator_steps"])
        self.num_steps = int(state["num_steps"])
