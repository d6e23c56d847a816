"""The FGSM-SDI initialization generator (Jia et al., "Boosting fast adversarial training with learnable
adversarial initialization"), built as the reference code's ``One_Layer_Attacker`` (jiaxiaojunQAQ/FGSM-SDI,
attacker.py), layer for layer:

    conv3x3(2C -> w, no bias) + BN(w, eps 1e-3) + ReLU                         (BasicConv2d)
    pre-activation residual block, plus identity:                              (GenBlock(w, w))
        BN(w, affine=False) -> PReLU -> conv3x3(w -> w) -> BN(w, affine=False) -> PReLU -> conv3x3(w -> w)
        the two convs xavier-uniform with gain sqrt(2), with bias
    BN(w, affine=False) -> conv3x3(w -> C, with bias) -> tanh

It sees the image in [0, 1], as the reference's does (its utils.py sets the CIFAR mean to 0 and std to 1, so
neither its generator nor its target model sees a normalised image), and the sign of the input gradient, and
returns a per-sample initialization in [-1, 1]; the caller multiplies by ε.
The reference's width w is 64 (``generator_width``). Its ``scale_last`` parameter is never used in its forward
pass and so is left out. These choices set where training starts: given the same weights this module and the
reference give the same output, and freshly initialised (train mode, 10 seeds, digits or uniform images) both
give mean |g| = 0.39 with 1.2% of outputs above 0.9; the post-activation block with a BatchNorm after the last
conv that raydist had before gave 0.56 and 14% (every output channel forced to zero batch mean and unit
variance, so a large share of the initialization sat at the saturated ends of tanh).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _PreActBlock(nn.Module):
    """BN -> PReLU -> conv -> BN -> PReLU -> conv, added to its input (the reference's GenBlock with equal in
    and out channels and no upsampling, so its shortcut is the identity)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, affine=False)
        self.act1 = nn.PReLU()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels, affine=False)
        self.act2 = nn.PReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.conv1, self.conv2):  # the reference's _initialize: weights only, biases keep torch's
            nn.init.xavier_uniform_(conv.weight, gain=math.sqrt(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.bn1(x)))
        return x + self.conv2(self.act2(self.bn2(h)))


class SDIGenerator(nn.Module):
    """``g(x, sign ∇x L) -> [-1, 1]`` for images ``x`` in [0, 1], the reference's One_Layer_Attacker (see the
    module docstring)."""

    def __init__(self, in_channels: int = 3, hidden: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(2 * in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden, eps=1e-3),
            nn.ReLU(),
        )
        self.block = _PreActBlock(hidden)
        self.head = nn.Sequential(nn.BatchNorm2d(hidden, affine=False), nn.Conv2d(hidden, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, grad_sign: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([x, grad_sign.to(x.dtype)], dim=1))
        return torch.tanh(self.head(self.block(h)))
