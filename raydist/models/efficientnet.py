"""EfficientNet B0–B7 (Tan & Le) from torchvision, with the activation of our choice, and a
B0 adapted to 32x32 inputs.

SAT's largest gains are on EfficientNet.  torchvision hard-codes ``nn.SiLU`` in every
``Conv2dNormActivation`` and in the squeeze-excitation's first layer, each a module of its
own, so :func:`~raydist.models.swap.swap_activations` replaces them one by one (the SE gate,
``nn.Sigmoid``, stays).  Note that ``create_model``'s default activation is ``"relu"``, as for
every model here; the original EfficientNet is ``activation="silu"``.

``efficientnet_b0_cifar``: the B0 table with a stride-1 stem and a stride-1 first
downsampling stage (16 → 24 channels), so a 32x32 image is downsampled 8x (to 4x4, like
the CIFAR ResNet-18) instead of 32x.
"""

from __future__ import annotations

from torch import nn

from raydist.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model
from raydist.models.swap import swap_activations
from raydist.models.torchvision_models import new_stem_conv

# name: (width_mult, depth_mult, native resolution, dropout, parameters for 10 classes)
_VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2, 4_020_358),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2, 6_525_994),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3, 7_715_084),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3, 10_711_602),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4, 17_566_546),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4, 28_361_274),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5, 40_758_754),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5, 63_812_570),
}

# B0's stages: (expand ratio, kernel, stride, in channels, out channels, layers)
_B0_STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


def _finish(model: nn.Module, activation: str, in_channels: int, stem_stride: int | None = None) -> nn.Module:
    """Swap every SiLU for ``activation`` and rebuild the stem conv if its shape must change."""
    stem = model.features[0][0]
    if in_channels != stem.in_channels or (stem_stride is not None and stem.stride != (stem_stride, stem_stride)):
        model.features[0][0] = new_stem_conv(stem, in_channels, stem_stride)
    swap_activations(model, activation)
    return model


def _register_imagenet(name: str, width_mult: float, depth_mult: float, size: int, drop: float, n: int) -> None:
    def build(
        num_classes: int,
        activation: str,
        in_channels: int,
        dropout: float = drop,
        stochastic_depth_prob: float = 0.2,
    ) -> nn.Module:
        from torchvision import models

        model = getattr(models, name)(
            weights=None, num_classes=num_classes, dropout=dropout, stochastic_depth_prob=stochastic_depth_prob
        )
        return _finish(model, activation, in_channels)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"EfficientNet-{name[-2:].upper()} at {size}x{size} (torchvision layout), random initialisation."
    register_model(
        name,
        input_size=(3, size, size),
        description=f"ImageNet EfficientNet-{name[-2:].upper()} (torchvision; width x{width_mult}, "
        f"depth x{depth_mult})",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_params=n,
    )(build)


for _name, _variant in _VARIANTS.items():
    _register_imagenet(_name, *_variant)


@register_model(
    "efficientnet_b0_cifar",
    description="EfficientNet-B0 for 32x32 (stride-1 stem and first downsampling stage: 8x, not 32x)",
    num_params=4_020_358,
)
def efficientnet_b0_cifar(
    num_classes: int,
    activation: str,
    in_channels: int,
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
    dropout: float = 0.2,
    stochastic_depth_prob: float = 0.2,
) -> nn.Module:
    """EfficientNet-B0 for CIFAR-size images; ``width_mult``/``depth_mult`` scale it as B1–B7 do."""
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    stages = []
    for i, (expand, kernel, stride, c_in, c_out, n) in enumerate(_B0_STAGES):
        stride = 1 if i == 1 else stride  # keep 32x32 inputs from shrinking to 1x1
        stages.append(MBConvConfig(expand, kernel, stride, c_in, c_out, n, width_mult, depth_mult))
    model = EfficientNet(stages, dropout, stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes)
    return _finish(model, activation, in_channels, stem_stride=1)
