"""Model registry in the style of timm: ``@register_model`` builders, ``create_model(name)``.

Every model returned by :func:`create_model` takes images in [0, 1] and normalizes them
itself, so attacks, ε-balls and the image box all live in pixel space and no caller has to
remember the dataset statistics.

Names: the CIFAR-size models (``resnet18``, ``preact_resnet18``, ``wide_resnet34_10``,
``resnext29_32x4d``, ``efficientnet_b0_cifar``, ...) and the ImageNet-size ones (``resnet50``,
``resnext50_32x4d``, ``efficientnet_b0`` ... ``efficientnet_b7``, ...); ``raydist models`` lists
them.  ``timm/<name>`` builds any timm model when timm is installed (not listed, not in
:data:`MODEL_NAMES`).  Weights are always randomly initialised; ``pretrained_path=`` loads a
local state_dict file or raydist checkpoint, nothing is ever downloaded.
"""

from __future__ import annotations

import inspect
import os
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
    mean: tuple[float, ...] | None = None  # default normalization (None: 0.5 per channel)
    std: tuple[float, ...] | None = None
    num_params: int | None = None  # for 10 classes, 3 channels, default kwargs (None: counted on demand)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_REGISTRY: dict[str, ModelEntry] = {}

# Live view of the registered names (``"resnet18" in MODEL_NAMES``) for config validation;
# it stays current as more models register.
MODEL_NAMES: KeysView[str] = _REGISTRY.keys()
_COUNTED: dict[str, int | None] = {}  # parameter counts measured on demand, for entries that declare none


def register_model(
    name: str,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    description: str = "",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_params: int | None = None,
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``fn(num_classes, activation, in_channels, **kw) -> nn.Module`` under ``name``.

    ``mean``/``std`` are the default input normalization (ImageNet statistics for ImageNet
    models; 0.5 when left out).  ``num_params`` (for 10 classes) lets ``raydist models`` show the
    size without building anything; left out, it is counted on demand on the meta device.
    """

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _COUNTED.pop(name, None)
        _REGISTRY[name] = ModelEntry(
            name, fn, tuple(input_size), description,
            tuple(float(v) for v in mean) if mean is not None else None,
            tuple(float(v) for v in std) if std is not None else None,
            num_params,
        )
        return fn

    return decorator


def get_model_entry(name: str) -> ModelEntry:
    """Look up a registered model (or a ``timm/...`` one); the error lists the choices."""
    entry = _REGISTRY.get(name)
    if entry is not None:
        return entry
    if name.startswith("timm/"):
        from raydist.models.timm_models import timm_entry

        return timm_entry(name)
    available = ", ".join(sorted(_REGISTRY))
    raise ValueError(f"unknown model '{name}'; available: {available} (or timm/<name> with timm installed)")



def count_parameters(name: str, num_classes: int = 10, **kwargs: object) -> int:
    """Parameter count of a model, built on the meta device (no memory, no initialisation)."""
    entry = get_model_entry(name)
    with torch.device("meta"):
        net = entry.builder(num_classes=num_classes, activation="relu", in_channels=3, **kwargs)
    return sum(p.numel() for p in net.parameters())


def _num_params(entry: ModelEntry) -> int | None:
    if entry.num_params is not None:
        return entry.num_params
    if entry.name not in _COUNTED:
        try:
            _COUNTED[entry.name] = count_parameters(entry.name)
        except Exception:  # noqa: BLE001 - a size we cannot count is shown as unknown
            _COUNTED[entry.name] = None
    return _COUNTED[entry.name]


def list_models() -> list[dict]:
    """Name, input size, parameter count (10 classes) and description of every registered
    model (for ``raydist models`` and config validation; builds nothing for the built-ins)."""
    return [
        {"name": e.name, "input_size": e.input_size, "num_params": _num_params(e), "description": e.description}
        for e in sorted(_REGISTRY.values(), key=lambda e: e.name)
    ]


def builder_kwargs(name: str) -> dict[str, object]:
    """The keyword arguments a model's builder takes beyond the common ones, with defaults."""
    return _entry_kwargs(get_model_entry(name))


def _entry_kwargs(entry: ModelEntry) -> dict[str, object]:
    common = {"num_classes", "activation", "in_channels"}
    params = inspect.signature(entry.builder).parameters.values()
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.name not in common and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _check_builder_kwargs(entry: ModelEntry, kwargs: dict) -> None:
    params = inspect.signature(entry.builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = _entry_kwargs(entry)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise ValueError(f"model '{entry.name}' does not take {unknown}; its keyword arguments: {takes}")


def _channel_stats(
    value: float | Sequence[float] | None,
    in_channels: int,
    what: str,
    default: Sequence[float] | None = None,
) -> list[float]:
    if value is None:
        if default is None:
            return [0.5] * in_channels
        if len(default) == in_channels:
            return [float(v) for v in default]
        return [sum(default) / len(default)] * in_channels  # e.g. ImageNet statistics for a grayscale input
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
    pretrained_path: str | os.PathLike | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model that takes [0, 1] images and normalizes inside.

    ``mean``/``std`` default to the model's registered statistics (ImageNet's for ImageNet
    models, 0.5 per channel otherwise); ``kwargs`` go to the builder (e.g. ``width``; an
    argument the builder does not take is a ``ValueError`` listing the ones it does).
    Weights are random unless ``pretrained_path`` names a local file to load (see
    :func:`raydist.models.pretrained.load_pretrained`); the path is not part of the spec.
    """
    entry = get_model_entry(name)
    make_activation(activation)  # fail early with the list of choices
    _check_builder_kwargs(entry, kwargs)
    mean_l = _channel_stats(mean, in_channels, "mean", entry.mean)
    std_l = _channel_stats(std, in_channels, "std", entry.std)
    net = entry.builder(num_classes=num_classes, activation=activation, in_channels=in_channels, **kwargs)
    input_size = (in_channels, *entry.input_size[1:])
    spec = model_spec_for(name, num_classes, activation, in_channels, input_size, mean_l, std_l, **kwargs)
    model = ImageClassifier(Normalize(mean_l, std_l), net, spec)
    if pretrained_path is not None:
        from raydist.models.pretrained import load_pretrained

        load_pretrained(model, pretrained_path)
    return model
