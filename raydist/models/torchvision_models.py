"""ImageNet-size ResNets and ResNeXts from torchvision, with the activation of our choice.

torchvision's ``Bottleneck`` keeps one ``self.relu`` module and calls it three times, so a
module swap would give the three places one shared module (one α for ``smoothrelu`` where
there should be three).  Each bottleneck is therefore rebuilt as :class:`ActBottleneck`, which
takes over the original convs and norms (same parameter names, so torchvision state_dicts
load unchanged) and has its own activation at each place.  torchvision is imported only when
a model is built: importing it costs seconds, and ``raydist models`` should stay instant.
Weights are always random (``weights=None``); ``pretrained_path`` loads local ones.
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.activations import make_activation
from raydist.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model

IMAGENET_SIZE = (3, 224, 224)


def new_stem_conv(old: nn.Conv2d, in_channels: int, stride: int | None = None) -> nn.Conv2d:
    """A freshly initialised copy of a stem conv with another input-channel count or stride."""
    conv = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride if stride is None else stride,
        padding=old.padding,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class ActBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` with a separate activation after each BN and after the sum."""

    expansion = 4

    def __init__(self, block: nn.Module, activation: str) -> None:
        super().__init__()
        self.conv1, self.bn1 = block.conv1, block.bn1
        self.act1 = make_activation(activation)
        self.conv2, self.bn2 = block.conv2, block.bn2
        self.act2 = make_activation(activation)
        self.conv3, self.bn3 = block.conv3, block.bn3
        self.downsample = block.downsample
        self.act3 = make_activation(activation)
        self.stride = block.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + identity)


def torchvision_resnet(
    layers: list[int],
    num_classes: int,
    activation: str,
    in_channels: int,
    groups: int = 1,
    width_per_group: int = 64,
    zero_init_residual: bool = False,
) -> nn.Module:
    """torchvision ``ResNet(Bottleneck, layers, groups, width_per_group)`` with every activation
    made by ``make_activation(activation)`` and a stem for ``in_channels`` channels."""
    from torchvision.models.resnet import Bottleneck, ResNet

    model = ResNet(
        Bottleneck, layers, num_classes=num_classes, zero_init_residual=zero_init_residual,
        groups=groups, width_per_group=width_per_group,
    )
    if in_channels != 3:
        model.conv1 = new_stem_conv(model.conv1, in_channels)
    model.relu = make_activation(activation)  # the stem's
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for i, block in enumerate(list(stage)):
            if not isinstance(block, Bottleneck):  # pragma: no cover - torchvision changed
                raise TypeError(f"unexpected block {type(block).__name__} in torchvision ResNet")
            stage[i] = ActBottleneck(block, activation)
    return model


_RESNETS = {
    # name: (layers, groups, width_per_group, parameters for 10 classes, description)
    "resnet50": ([3, 4, 6, 3], 1, 64, 23_528_522, "ImageNet ResNet-50 (torchvision layout)"),
    "resnet101": ([3, 4, 23, 3], 1, 64, 42_520_650, "ImageNet ResNet-101 (torchvision layout)"),
    "resnet152": ([3, 8, 36, 3], 1, 64, 58_164_298, "ImageNet ResNet-152 (torchvision layout)"),
    "resnext50_32x4d": ([3, 4, 6, 3], 32, 4, 23_000_394, "ImageNet ResNeXt-50 32x4d (torchvision layout)"),
    # SAT's "4x wider" ResNeXt-50 (--d=50 --group=32 --res2-bottleneck=8); torchvision ships no such model, so it
    # is torchvision's ResNet class with groups 32 and width_per_group 8
    "resnext50_32x8d": ([3, 4, 6, 3], 32, 8, 45_993_290,
                        "ImageNet ResNeXt-50 32x8d, SAT's 4x-wider ResNet (torchvision's blocks; not a torchvision "
                        "model)"),
    "resnext101_32x8d": ([3, 4, 23, 3], 32, 8, 86_762_826, "ImageNet ResNeXt-101 32x8d (torchvision layout)"),
}


def _register_resnet(name: str, layers: list[int], groups: int, width: int, n_params: int, description: str) -> None:
    def build(
        num_classes: int, activation: str, in_channels: int, zero_init_residual: bool = False
    ) -> nn.Module:
        return torchvision_resnet(layers, num_classes, activation, in_channels, groups, width, zero_init_residual)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{description}; 224x224 inputs, random initialisation."
    register_model(
        name, input_size=IMAGENET_SIZE, description=description, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_params=n_params,
    )(build)


for _name, (_layers, _groups, _width, _n, _desc) in _RESNETS.items():
    _register_resnet(_name, _layers, _groups, _width, _n, _desc)
