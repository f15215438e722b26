"""A residual critic (potential) network for small images, f: (N, C, H, W) -> (N,).

The layout follows the ResNet discriminators of Mescheder et al. (2018, "Which training
methods for GANs do actually converge?"), which NOT and KNOT use as their potential: a 3x3
input convolution, then per level a pre-activation residual block (LeakyReLU 0.2 -> 3x3 conv
-> LeakyReLU -> 3x3 conv, added to a learned 1x1 shortcut when the width changes, the
residual branch scaled by 0.1) followed by 2x2 average pooling, until the feature map is 4x4;
one more residual block, then a linear layer on the flattened 4x4 features.  No normalisation
layers, so the critic's value on one image does not depend on the rest of the batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import BenchError


class CriticBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        hidden = min(cin, cout)
        self.conv0 = nn.Conv2d(cin, hidden, 3, padding=1)
        self.conv1 = nn.Conv2d(hidden, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.leaky_relu(x, 0.2))
        h = self.conv1(F.leaky_relu(h, 0.2))
        return self.shortcut(x) + 0.1 * h


class ResNetCritic(nn.Module):
    """Scalar potential on ``in_channels`` x ``image_size`` x ``image_size`` images.

    ``image_size`` must be 4 times a power of two (8, 16, 32, 64, ...); the width doubles at
    every level from ``base`` up to ``max_channels``.
    """

    def __init__(self, in_channels: int, image_size: int = 32, base: int = 64, max_channels: int = 512):
        super().__init__()
        levels = math.log2(image_size / 4) if image_size >= 4 else -1
        if levels < 0 or levels != int(levels):
            raise BenchError(f"ResNetCritic needs image_size = 4 * 2**k (8, 16, 32, ...), got {image_size}; "
                             "pad the images with bench.nn.pad_to first")
        self.image_size = image_size
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = base
        for level in range(int(levels)):
            cout = min(base * 2 ** (level + 1), max_channels)
            blocks += [CriticBlock(ch, cout), nn.AvgPool2d(2)]
            ch = cout
        blocks.append(CriticBlock(ch, ch))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(ch * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise BenchError(f"ResNetCritic was built for {self.image_size}x{self.image_size} images, "
                             f"got {tuple(x.shape[-2:])}")
        h = self.blocks(self.conv_in(x))
        return self.head(F.leaky_relu(h, 0.2).flatten(1)).squeeze(1)
