"""CIFAR ResNet-18 (He et al.) as used by PGD-AT and FGSM-SDI.

CIFAR variant: 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep enough resolution.
``width`` is the base channel count (64 in the papers); width 16 costs 16x less compute,
which is what CPU demos and tests use.  Every non-linearity is a module made by
``make_activation`` so SAT can swap it.
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.activations import make_activation
from raydist.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; activation after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, four stages of BasicBlocks (channels w, 2w, 4w, 8w), global average pool, linear."""

    def __init__(
        self,
        num_blocks: list[int],
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation)
        stages = []
        in_planes = width
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, activation))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        if zero_init_residual:  # SAT's ResNets: each block starts as its shortcut (γ of its last BN = 0)
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model("resnet18", description="CIFAR ResNet-18 (3x3 stem, no max-pool); width = base channels")
def resnet18(
    num_classes: int, activation: str, in_channels: int, width: int = 64, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-18 for 32x32 inputs, the architecture of the FGSM-SDI and PGD-AT tables; ``zero_init_residual``
    zero-initialises the last BatchNorm of every block, as SAT's ResNets do."""
    return ResNet([2, 2, 2, 2], num_classes, activation, in_channels, width, zero_init_residual)
