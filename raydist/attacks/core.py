"""Building blocks shared by every attack: the input gradient, the L∞ projection, and the
bookkeeping that makes evaluation attacks safe to call on a model in any state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

AutocastFactory = Callable[[], AbstractContextManager]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Summed, not averaged, so each sample's gradient does not shrink with the batch size.
    return F.cross_entropy(logits.float(), y, reduction="sum")


LOSSES: dict[str, LossFn] = {"ce": _ce_sum}


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the duration (and are restored after), so a pass whose backward only
    wants ∇ₓ builds no graph for the weights. Eager autograd would skip the weight gradients of such a pass
    anyway; a torch.compile'd model would not (its compiled backward computes every gradient its graph was
    traced with), so without this every attack step of a compiled model also paid for a weight gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | LossFn = "ce",
    autocast: AutocastFactory | None = None,
) -> torch.Tensor:
    """∇ₓ loss(model(x), y), leaving the model's mode and parameter ``.grad`` untouched.

    ``torch.autograd.grad`` with respect to the input only, the parameters frozen meanwhile
    (:func:`frozen_parameters`), so no weight gradients are computed or accumulated and a training
    method can call this between its own zero_grad and backward.
    Works under an outer ``torch.no_grad()`` (evaluators often are).  ``autocast`` is a
    zero-arg callable returning a context manager for the forward pass; the loss is in fp32.
    """
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), frozen_parameters(model):
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(x)
        value = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(value, x)
    return grad


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Clamp ``x_adv`` into the L∞ ball of radius ``eps`` around ``x`` and into the image box [0, 1]."""
    return torch.clamp(torch.clamp(x_adv, min=x - eps, max=x + eps), 0.0, 1.0)


def uniform_noise(
    x: torch.Tensor, eps: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """U(-eps, eps) noise shaped like ``x``, from ``generator`` (or the global RNG if None)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (2 * noise - 1) * eps


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A local RNG for ``seed`` on ``device`` so seeded attacks leave the global RNG alone."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation attacks run the model in eval mode; restore every submodule's own mode after
    (not just the top-level flag, so e.g. deliberately frozen BatchNorm stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch off any autocast the caller may be inside: evaluation attacks are fp32."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def check_eps(eps: float) -> None:
    """Reject negative radii early with a clear message."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
