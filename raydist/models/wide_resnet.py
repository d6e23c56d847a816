"""Wide ResNet (Zagoruyko & Komodakis) for 32x32 inputs, as used by TRADES, MART, AWP and the
robustness leaderboards (WRN-34-10, WRN-28-10).

WRN-d-k: a 3x3 stem with 16 channels, three groups of (d − 4)/6 pre-activation blocks with
16k, 32k, 64k channels (strides 1, 2, 2), a final BN + activation, average pool, linear.  The
block is the one of the TRADES/Madry code: when a block changes shape, its shortcut is a 1x1
conv applied to the *activated* input.  ``depth`` and ``width`` (the widening factor k) are
builder arguments; ``width=1`` makes a tiny model for CPU tests.
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.activations import make_activation
from raydist.models.registry import register_model


class WideBasicBlock(nn.Module):
    """BN-act-conv3x3-BN-act-(dropout)-conv3x3, plus identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` for small images; adaptive pooling lets other resolutions through."""

    def __init__(
        self,
        depth: int = 34,
        width: int = 10,
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"Wide ResNet width (widening factor) must be >= 1, got {width}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        groups = []
        in_planes = channels[0]
        for i, planes in enumerate(channels[1:]):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, stride if j == 0 else 1, activation, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # the initialisation of the reference implementation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.act(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(
    "wide_resnet34_10",
    description="CIFAR WRN-34-10 (TRADES/AWP standard); depth = 6n+4, width = widening factor",
    num_params=46_160_474,
)
def wide_resnet34_10(
    num_classes: int, activation: str, in_channels: int, depth: int = 34, width: int = 10, dropout: float = 0.0
) -> nn.Module:
    """WRN-34-10, the large model of the robustness literature (46M parameters)."""
    return WideResNet(depth, width, num_classes, activation, in_channels, dropout)


@register_model(
    "wide_resnet28_10",
    description="CIFAR WRN-28-10 (RobustBench's common large model); depth = 6n+4, width = widening factor",
    num_params=36_479_194,
)
def wide_resnet28_10(
    num_classes: int, activation: str, in_channels: int, depth: int = 28, width: int = 10, dropout: float = 0.0
) -> nn.Module:
    """WRN-28-10 (36M parameters)."""
    return WideResNet(depth, width, num_classes, activation, in_channels, dropout)
