"""Model registry in the style of timm: ``@register_model`` builders, ``create_model(name)``.

Every model returned by :func:`create_model` takes images in [0, 1] and normalizes them
itself, so attacks, ε-balls and the image box all live in pixel space and no caller has to
remember the dataset statistics.
"""

from __future__ import annotations

from collections.abc import Callable, KeysView, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from raydist.models.activations import make_activation

ModelBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model name."""

    name: str
    builder: ModelBuilder
    input_size: tuple[int, int, int]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}

# Live view of the registered names (``"resnet18" in MODEL_NAMES``) for config validation;
# it stays current as more models register.
MODEL_NAMES: KeysView[str] = _REGISTRY.keys()


def register_model(
    name: str, *, input_size: tuple[int, int, int] = (3, 32, 32), description: str = ""
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``fn(num_classes, activation, in_channels, **kw) -> nn.Module`` under ``name``."""

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = ModelEntry(name, fn, tuple(input_size), description)
        return fn

    return decorator


def get_model_entry(name: str) -> ModelEntry:
    """Look up a registered model; the error lists the choices so a typo is obvious."""
    try:
        return _REGISTRY[name]
    except KeyError:
        available = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown model '{name}'; available: {available}") from None


def list_models() -> list[dict]:
    """Name, input size and description of every registered model (for ``raydist models``)."""
    return [
        {"name": e.name, "input_size": e.input_size, "description": e.description}
        for e in sorted(_REGISTRY.values(), key=lambda e: e.name)
    ]


def _channel_stats(value: float | Sequence[float] | None, in_channels: int, what: str) -> list[float]:
    if value is None:
        return [0.5] * in_channels
    if isinstance(value, (int, float)):
        return [float(value)] * in_channels
    stats = [float(v) for v in value]
    if len(stats) != in_channels:
        raise ValueError(f"{what} has {len(stats)} values but the model has {in_channels} input channels")
    return stats


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics stored as buffers (they follow
    ``.to(device)`` and are saved with the weights)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """A backbone behind its input normalization: inputs are images in [0, 1].

    ``spec`` holds everything needed to rebuild the model (see ``model_spec_for``), so a
    checkpoint can describe itself.
    """

    def __init__(self, normalize: Normalize, net: nn.Module, spec: dict | None = None) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.spec = dict(spec or {})
        self.in_channels = int(normalize.mean.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def model_spec_for(
    name: str,
    num_classes: int,
    activation: str,
    in_channels: int,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs: object,
) -> dict:
    """The plain-data description of a model stored in checkpoints and rebuilt by ``create_model``."""
    return {
        "name": name,
        "num_classes": int(num_classes),
        "activation": activation,
        "in_channels": int(in_channels),
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "kwargs": dict(kwargs),
    }


def create_model(
    name: str,
    num_classes: int = 10,
    activation: str = "relu",
    in_channels: int = 3,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model that takes [0, 1] images and normalizes inside.

    ``mean``/``std`` default to 0.5 per channel; ``kwargs`` go to the builder (e.g. ``width``).
    """
    entry = get_model_entry(name)
    make_activation(activation)  # fail early with the list of choices
    mean_l = _channel_stats(mean, in_channels, "mean")
    std_l = _channel_stats(std, in_channels, "std")
    net = entry.builder(num_classes=num_classes, activation=activation, in_channels=in_channels, **kwargs)
    input_size = (in_channels, *entry.input_size[1:])
    spec = model_spec_for(name, num_classes, activation, in_channels, input_size, mean_l, std_l, **kwargs)
    return ImageClassifier(Normalize(mean_l, std_l), net, spec)
