"""Swap the activations of a ready-made model (torchvision, timm) module by module.

Models built here take their activation by name; models built elsewhere hard-code theirs
(torchvision's EfficientNet uses ``nn.SiLU`` in every ``Conv2dNormActivation`` and
``SqueezeExcitation``).  :func:`swap_activations` replaces every activation *module* with a
fresh one from :func:`~raydist.models.activations.make_activation`.  It cannot reach
functional calls (``F.relu(x)`` in a ``forward``) nor split one module that a block calls
several times (torchvision's ``Bottleneck.relu``); :func:`functional_activation_calls` finds
the former, and the builders in :mod:`raydist.models.torchvision_models` handle the latter.

Gates are not activations: ``nn.Sigmoid``/``nn.Hardsigmoid``/``nn.Tanh`` (squeeze-excitation,
attention) are left alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from raydist.models.activations import ACTIVATIONS, make_activation

__all__ = ["SWAPPABLE_ACTIVATIONS", "functional_activation_calls", "is_activation", "swap_activations"]

# torch.nn activation layers that stand where a ReLU would (not gates like Sigmoid).
SWAPPABLE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    *(t for t in ACTIVATIONS.values() if isinstance(t, type)),
)

# Activation classes of other libraries (timm's Swish, GELUTanh, QuickGELU, HardSwishMe, ...),
# recognised by lower-case class name since the library may not be importable here.
_FOREIGN_ACTIVATION_NAMES = frozenset(
    {
        "swish", "swishme", "swishauto", "silu", "mish", "mishme", "mishauto", "gelu", "gelutanh",
        "quickgelu", "hardswish", "hardswishme", "hardmish", "hardmishme", "relu", "relu6", "leakyrelu",
        "elu", "celu", "selu", "softplus", "prelu",
    }
)

# Functions whose call in a forward pass means "an activation that no module swap reaches".
_FUNCTIONAL_NAMES = frozenset(
    {
        "relu", "relu_", "relu6", "silu", "silu_", "gelu", "elu", "elu_", "celu", "celu_", "selu", "selu_",
        "softplus", "mish", "hardswish", "hardswish_", "leaky_relu", "leaky_relu_", "prelu",
    }
)


def is_activation(module: nn.Module, types: tuple[type[nn.Module], ...] = SWAPPABLE_ACTIVATIONS) -> bool:
    """Whether :func:`swap_activations` would replace ``module``."""
    return isinstance(module, types) or type(module).__name__.lower() in _FOREIGN_ACTIVATION_NAMES


def swap_activations(
    model: nn.Module, activation: str, types: tuple[type[nn.Module], ...] = SWAPPABLE_ACTIVATIONS
) -> int:
    """Replace every activation module in ``model`` by a fresh ``make_activation(activation)``.

    Each place in the module tree gets its own module (one learnable α per layer for
    ``smoothrelu``), even where the original model registered one instance at several places.
    Returns the number of modules replaced; the model is changed in place.
    """
    make_activation(activation)  # fail before touching the model
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and is_activation(child, types):
                parent._modules[child_name] = make_activation(activation)
                count += 1
    return count


class _RecordCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        name = getattr(func, "__name__", "")
        if name in _FUNCTIONAL_NAMES:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def functional_activation_calls(model: nn.Module, *inputs: torch.Tensor) -> Counter[str]:
    """Run ``model(*inputs)`` (no grad) and count the activation functions it calls.

    Every ``nn.ReLU`` module shows up as one ``relu`` call too, so compare against the module
    count: with ``activation="gelu"`` a fully swapped model calls ``gelu`` only.
    """
    recorder = _RecordCalls()
    with torch.no_grad(), recorder:
        model(*inputs)
    return recorder.calls


def count_modules(model: nn.Module, types: Iterable[type[nn.Module]]) -> int:
    """How many modules of ``model`` are instances of ``types`` (a test and report helper)."""
    types = tuple(types)
    return sum(isinstance(m, types) for m in model.modules())
