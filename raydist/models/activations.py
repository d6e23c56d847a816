"""Activation functions by name.

Smooth adversarial training (SAT) is an axis that combines with every model, so every model
builder takes its activation as a *name* and builds a fresh module from this table at every
place it needs one.  Models must never call ``F.relu`` directly: swapping modules does
nothing for functional calls.  The table maps a name to a zero-or-keyword-argument factory,
so later additions (parametric Softplus, SmoothReLU, ...) are one entry each.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ActivationFactory = Callable[..., nn.Module]

ACTIVATIONS: dict[str, ActivationFactory] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "celu": nn.CELU,
}


def make_activation(name: str, **kwargs: object) -> nn.Module:
    """Build a new activation module by name (``kwargs`` go to its factory, e.g. ``beta=10``).

    A new module per call, so modules with learnable parameters are never shared by accident.
    """
    try:
        factory = ACTIVATIONS[name]
    except KeyError:
        choices = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation '{name}'; available: {choices}") from None
    return factory(**kwargs)
