"""PreAct ResNet-18 as in Wong et al. ("Fast is better than free", fast_adversarial repo).

Pre-activation blocks (BN -> act -> conv) with the shortcut taken after the first
BN+activation when it needs a projection, plus a final BN + activation before pooling.
``width`` is the base channel count (64 in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.activations import make_activation
from raydist.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-act-conv-BN-act-conv with an identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """3x3 stem conv, four stages of PreActBlocks, BN + activation, average pool, linear."""

    def __init__(
        self,
        num_blocks: list[int],
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = width
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, activation))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.act(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


@register_model(
    "preact_resnet18", description="PreAct ResNet-18 of Wong et al. (fast AT); width = base channels"
)
def preact_resnet18(num_classes: int, activation: str, in_channels: int, width: int = 64) -> nn.Module:
    """PreAct ResNet-18, the architecture of the FGSM-RS ("fast is better than free") results."""
    return PreActResNet([2, 2, 2, 2], num_classes, activation, in_channels, width)
