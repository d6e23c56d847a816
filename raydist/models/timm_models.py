"""Any timm model as ``create_model("timm/<name>")``, when timm is installed.

timm is optional: nothing imports it until a ``timm/`` name is asked for.  The model is built
with random weights (``pretrained=False``; use ``pretrained_path`` for local weights), its
activations swapped module by module (:func:`~raydist.models.swap.swap_activations`; timm's
own activation classes are recognised by name), and it gets the normalization and input size
of timm's pretrained config.  Models that call activations as functions inside ``forward``
keep those: check with :func:`~raydist.models.swap.functional_activation_calls`.
These names are not in ``MODEL_NAMES``/``list_models()`` (timm has over a thousand).
"""

from __future__ import annotations

from torch import nn

from raydist.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelEntry
from raydist.models.swap import swap_activations

PREFIX = "timm/"


def _import_timm():  # noqa: ANN202 - returns the module
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need timm installed (pip install timm)") from None
    return timm


def _pretrained_cfg(timm, name: str) -> tuple[tuple[int, int, int], tuple, tuple]:  # noqa: ANN001
    """Input size, mean and std from timm's config for ``name`` (ImageNet defaults if unknown)."""
    cfg = None
    getter = getattr(getattr(timm, "models", None), "get_pretrained_cfg", None)
    if getter is not None:
        try:
            cfg = getter(name)
        except Exception:  # noqa: BLE001 - older timm or an untagged name: fall back to defaults
            cfg = None

    def field(key: str, default: tuple) -> tuple:
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        return tuple(value) if value else default

    size = field("input_size", (3, 224, 224))
    return (int(size[0]), int(size[1]), int(size[2])), field("mean", IMAGENET_MEAN), field("std", IMAGENET_STD)


def timm_entry(name: str) -> ModelEntry:
    """A registry entry for ``timm/<model>``; ``ValueError`` if timm is missing or lacks the model."""
    timm = _import_timm()
    model_name = name[len(PREFIX) :]
    if not model_name or not timm.is_model(model_name):
        raise ValueError(f"timm has no model '{model_name}' (see timm.list_models())")
    input_size, mean, std = _pretrained_cfg(timm, model_name)

    def build(num_classes: int, activation: str, in_channels: int, **kwargs: object) -> nn.Module:
        net = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
        swap_activations(net, activation)
        return net

    build.__name__ = build.__qualname__ = model_name
    return ModelEntry(name, build, input_size, f"timm model {model_name}", mean, std, None)
