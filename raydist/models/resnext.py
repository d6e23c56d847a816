"""ResNeXt-29 for 32x32 inputs (Xie et al. 2017, CIFAR variant), laid out as the paper's own code
(facebookresearch/ResNeXt, models/resnext.lua, CIFAR branch, bottleneck form C).

A 3x3 stem with ``width`` (64) channels, three stages of three bottleneck blocks (strides 1, 2, 2), global
average pool, linear.  A block is 1x1 conv to ``cardinality x d`` channels, grouped 3x3 conv (``cardinality``
groups), 1x1 conv to the stage's output width, plus the shortcut; d is ``bottleneck_width`` in the first stage
and doubles at every stage, the output widths are 4·width·2^stage = 256, 512, 1024 whatever the cardinality and
d (so ResNeXt-29 8x64d and 16x64d have the paper's 34.4M and 68.1M parameters).  kuangliu/pytorch-cifar's
layout, which raydist followed before, makes the output 2·C·d, which equals the paper's only at C·d = 128 (32x4d).
``resnext29_32x4d``: cardinality 32, bottleneck width 4.  Deliberate deviation: torch's default conv
initialisation, not the Lua code's normal(0, sqrt(2 / (k·k·out))).
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.activations import make_activation
from raydist.models.registry import register_model


class ResNeXtBlock(nn.Module):
    """Grouped-convolution bottleneck; activation after each BN and after the sum."""

    def __init__(
        self, in_planes: int, cardinality: int, bottleneck_width: int, stride: int, activation: str, out_planes: int
    ) -> None:
        super().__init__()
        group_width = cardinality * bottleneck_width
        self.conv1 = nn.Conv2d(in_planes, group_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.act2 = make_activation(activation)
        self.conv3 = nn.Conv2d(group_width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )
        self.act3 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


class ResNeXtCifar(nn.Module):
    """Stem, ``len(num_blocks)`` stages of ResNeXt blocks, average pool, linear."""

    def __init__(
        self,
        num_blocks: list[int],
        cardinality: int,
        bottleneck_width: int,
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if cardinality < 1 or bottleneck_width < 1 or width < 1:
            raise ValueError(f"cardinality, bottleneck_width and width must be >= 1, got {cardinality}, "
                             f"{bottleneck_width}, {width}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation)
        stages = []
        in_planes = width
        for i, n in enumerate(num_blocks):
            out_planes = 4 * width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ResNeXtBlock(in_planes, cardinality, bottleneck_width, stride, activation, out_planes))
                in_planes = out_planes
            stages.append(nn.Sequential(*blocks))
            bottleneck_width *= 2
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        if zero_init_residual:  # SAT's ResNets: each block starts as its shortcut (γ of its last BN = 0)
            for m in self.modules():
                if isinstance(m, ResNeXtBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.act1(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(
    "resnext29_32x4d",
    description="CIFAR ResNeXt-29 (3x3 stem, 3 stages of 3 blocks, outputs 256/512/1024); cardinality x "
                "bottleneck_width = 32x4d; width = stem channels (stage outputs 4/8/16 x width)",
    num_params=4_775_754,
)
def resnext29_32x4d(
    num_classes: int, activation: str, in_channels: int, cardinality: int = 32, bottleneck_width: int = 4,
    width: int = 64, zero_init_residual: bool = False,
) -> nn.Module:
    """ResNeXt-29 32x4d (about 4.8M parameters); other cardinality x bottleneck_width (8x64d, 16x64d) keep the
    paper's stage widths; shrink ``width`` (and the two others) for CPU runs."""
    return ResNeXtCifar([3, 3, 3], cardinality, bottleneck_width, num_classes, activation, in_channels, width,
                        zero_init_residual)
