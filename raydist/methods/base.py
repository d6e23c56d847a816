"""What every training method shares: one batch in, one optimizer step out.

A method owns the recipe for the training example (clean, PGD, FGSM-RS, FGSM-SDI, ...) and
performs the weight update; the training loop owns data, schedules, metrics and Ray.  The
model may be wrapped in DistributedDataParallel: the wrapped model does the training
forward/backward (so gradients are all-reduced), while attack-only passes use the inner
module so DDP's reducer never sees a forward without its backward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.profiler import record_function

AutocastFactory = Callable[[], AbstractContextManager]

# SAT's controlled experiment: where relu_smoothgrad uses its smooth backward (attacker, optimizer)
SMOOTH_BACKWARD: dict[str, tuple[bool, bool]] = {
    "none": (False, False), "attacker": (True, False), "optimizer": (False, True), "both": (True, True),
}


def _accepts_fused(optimizer_cls: type[torch.optim.Optimizer]) -> bool:
    return "fused" in inspect.signature(optimizer_cls.__init__).parameters


def fused_optimizer_kwargs(optimizer_cls: type[torch.optim.Optimizer], params: Iterable[Any]) -> dict[str, Any]:
    """``{"fused": True}`` when every parameter lives on a CUDA or CPU device and this torch has a fused
    ``optimizer_cls``; else ``{}`` (the default foreach implementation). ``params``: tensors or param groups."""
    if not _accepts_fused(optimizer_cls):
        return {}
    tensors: list[torch.Tensor] = []
    for p in params:
        tensors.extend(p["params"] if isinstance(p, dict) else [p])
    if not tensors or any(t.device.type not in ("cuda", "cpu") or not t.is_floating_point() for t in tensors):
        return {}
    return {"fused": True}


def attack_view(model: nn.Module) -> nn.Module:
    """The module to run attack-only passes on: ``model.module`` under DDP, else ``model``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


class TrainMethod:
    """Base class: subclasses override :meth:`training_example` (and, if they keep extra
    learnable state, :meth:`extra_optimizers`, :meth:`state_dict`, :meth:`load_state_dict`).

    ``PARAMS`` lists the method's own keyword arguments and their defaults; config validation
    reads it through ``raydist.methods.METHOD_PARAMS``.
    """

    name: ClassVar[str] = "base"
    PARAMS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        epsilon: float,
        label_smoothing: float = 0.0,
        autocast: AutocastFactory | None = None,
        smooth_backward: str = "none",
    ) -> None:
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model = model
        self.attack_model = attack_view(model)
        self.optimizer = optimizer
        self.epsilon = float(epsilon)
        self.label_smoothing = float(label_smoothing)
        self.autocast: AutocastFactory = autocast if autocast is not None else contextlib.nullcontext
        if smooth_backward not in SMOOTH_BACKWARD:
            raise ValueError(f"smooth_backward must be one of {', '.join(SMOOTH_BACKWARD)}, got {smooth_backward!r}")
        from raydist.models.activations import configure_sat

        # attack passes run under self.sat.attack(), the weight update's forward + backward under self.sat.update()
        self.sat = configure_sat(self.attack_model, *SMOOTH_BACKWARD[smooth_backward])
        self.num_steps = 0  # target (model) updates made so far

    # -- the recipe -------------------------------------------------------------------------
    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        """The (adversarial) input this method trains on, detached; no weight update."""
        raise NotImplementedError

    def _step_example(self, x: Tensor, y: Tensor) -> Tensor:
        """Hook for methods that do extra work per step (FGSM-SDI's generator update)."""
        return self.training_example(x, y)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Training loss: cross-entropy with label smoothing, in fp32 even under autocast."""
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def _train_mode(self) -> None:
        # The papers craft training examples with the model in train mode (BN batch stats).
        if not self.model.training:
            self.model.train()

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Build the training example and take one optimizer step on it.

        Returns (loss, logits), both detached tensors on the device: no host sync here, the
        caller decides when to read them. Its phases are named for the profiler (raydist.example,
        raydist.update, raydist.optimizer; FGSM-SDI adds raydist.generator): bench/profile_step.py.
        """
        self._train_mode()
        with record_function("raydist.example"), self.sat.attack():
            x_train = self._step_example(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("raydist.update"), self.sat.update():
            with self.autocast():
                logits = self.model(x_train)
            loss = self.loss(logits, y)
            loss.backward()
        with record_function("raydist.optimizer"):
            self.optimizer.step()
        self.num_steps += 1
        return loss.detach(), logits.detach()

    # -- extra state ------------------------------------------------------------------------
    def extra_optimizers(self) -> list[Optimizer]:
        """Optimizers besides the model's that follow the model's lr schedule (the loop schedules them); an
        optimizer a method keeps at a constant lr (FGSM-SDI's generator, by default) is not listed."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint besides the model and its optimizer."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"method '{self.name}' keeps no extra state, got keys {sorted(state)}")
