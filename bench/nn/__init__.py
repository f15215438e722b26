"""Shared networks: the DDPM-style UNet, MLPs, and padding helpers for 28x28 digits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BenchError
from .mlp import MLP, ScoreMLP
from .unet import UNet, timestep_embedding

__all__ = ["UNet", "timestep_embedding", "MLP", "ScoreMLP", "pad_to", "crop_to", "canvas_side"]


def canvas_side(h: int, w: int, multiple: int | None = None) -> int:
    """Side of the square canvas a network works on: the next power of two (at least 8; what the
    ResNet critic needs), or with ``multiple`` the smallest multiple of it that holds the image
    (a UNet with L levels needs multiple = 2**(L-1): 28x28 digits stay 28x28 instead of 32x32,
    23 % fewer pixels, measured 28 % faster per UNet step on the CPU)."""
    import math
    if multiple:
        return multiple * math.ceil(max(h, w) / multiple)
    return max(8, 2 ** math.ceil(math.log2(max(h, w))))


def pad_to(x: torch.Tensor, size: int = 32, value: float = -1.0) -> torch.Tensor:
    """Centre ``x`` (N, C, H, W) in a ``size`` x ``size`` canvas filled with ``value`` (-1 = background)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise BenchError(f"pad_to: image {h}x{w} is larger than {size}; use a larger size")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=value)


def crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pad_to`: the centred ``h`` x ``w`` window."""
    H, W = x.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]
