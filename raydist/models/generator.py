"""The FGSM-SDI initialization generator (Jia et al., "Boosting fast adversarial training
with learnable adversarial initialization").

It sees the clean image and the sign of its input gradient and proposes a per-sample
initialization in [-1, 1] (the caller multiplies by ε).  Deliberately light: one conv, one
residual block, one conv — it runs once per batch on top of the target's passes.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(in_ch: int, out_ch: int) -> list[nn.Module]:
    # bias is redundant before BatchNorm
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch)]


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN added to the input, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(channels, channels), nn.ReLU(), *_conv_bn(channels, channels))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SDIGenerator(nn.Module):
    """``g(x, sign ∇x L) -> [-1, 1]``: conv3x3(2C→hidden)+BN+ReLU, residual block,
    conv3x3(hidden→C)+BN, tanh."""

    def __init__(self, in_channels: int = 3, hidden: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Sequential(*_conv_bn(2 * in_channels, hidden), nn.ReLU())
        self.block = _ResidualBlock(hidden)
        self.head = nn.Sequential(*_conv_bn(hidden, in_channels))

    def forward(self, x: torch.Tensor, grad_sign: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([x, grad_sign], dim=1))
        return torch.tanh(self.head(self.block(h)))
