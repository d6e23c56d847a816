"""Per-sample attack objectives (all to be *maximized*), forward/backward helpers and precision handling.

Every loss here maps ``(logits, y)`` to one value per sample, computed in fp32 whatever the model
ran in; attacks sum it for the gradient (so a sample's gradient does not depend on the batch size)
and compare it per sample to keep each sample's worst case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raydist.attacks.core import AutocastFactory, frozen_parameters

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PRECISIONS = ("fp32", "bf16")


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j per sample."""
    return logits.scatter(1, y[:, None], float("-inf")).amax(1)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini & Wagner's margin, max_{j != y} z_j - z_y: positive exactly when the sample is misclassified."""
    logits = logits.float()
    return _other_max(logits, y) - logits.gather(1, y[:, None]).squeeze(1)


def _need_classes(logits: torch.Tensor, k: int, what: str) -> None:
    if logits.shape[1] < k:
        raise ValueError(f"{what} needs at least {k} classes, the model has {logits.shape[1]}")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): -(z_y - max_{j != y} z_j) / (z_π1 - z_π3),
    with π the classes sorted by decreasing logit.  Invariant to shifting and rescaling the logits."""
    _need_classes(logits, 3, "the DLR loss")
    logits = logits.float()
    top = logits.topk(3, dim=1).values
    return -(logits.gather(1, y[:, None]).squeeze(1) - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020): -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)."""
    _need_classes(logits, 4, "the targeted DLR loss")
    logits = logits.float()
    top = logits.topk(4, dim=1).values
    diff = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
    return -diff / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES: dict[str, PerSampleLoss] = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}


def get_loss(loss: str | PerSampleLoss) -> PerSampleLoss:
    """A per-sample loss by name (``ce``, ``margin``, ``dlr``) or the callable itself."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss}'; available: {', '.join(LOSSES)}")
    return LOSSES[loss]


def autocast_for(precision: str, device: torch.device) -> AutocastFactory | None:
    """The forward-pass autocast for ``precision``: None for fp32 (the default of every attack),
    bf16 autocast on ``device`` only when asked for.  Losses stay fp32 either way."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision '{precision}'; available: {', '.join(PRECISIONS)}")


def _autocast(autocast: AutocastFactory | None) -> contextlib.AbstractContextManager:
    return autocast() if autocast is not None else contextlib.nullcontext()


def forward(model: nn.Module, x: torch.Tensor, autocast: AutocastFactory | None = None) -> torch.Tensor:
    """Logits in fp32, without building a graph."""
    with torch.no_grad(), _autocast(autocast):
        return model(x).float()


def loss_and_grad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: PerSampleLoss,
    autocast: AutocastFactory | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, per-sample loss, ∇ₓ of the summed loss) from one forward and one backward pass.

    Gradient with respect to the input only (no weight ``.grad``), and valid under an outer ``no_grad``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), frozen_parameters(model):
        with _autocast(autocast):
            logits = model(x)
        logits = logits.float()
        values = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(values.sum(), x)
    return logits.detach(), values.detach(), grad


def per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample vector so that it broadcasts against a batch shaped like ``x``."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def linf_norm(d: torch.Tensor) -> torch.Tensor:
    """Per-sample L∞ norm."""
    return d.flatten(1).abs().amax(1)


def l2_norm(d: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm."""
    return d.flatten(1).norm(dim=1)


def still_correct(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: AutocastFactory | None = None
) -> torch.Tensor:
    """Boolean mask of the samples the model classifies correctly."""
    return forward(model, x, autocast).argmax(1) == y
