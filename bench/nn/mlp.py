"""Multilayer perceptrons for vector (toy) tasks."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BenchError
from .unet import timestep_embedding


class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden`` with SiLU, then a linear output layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ScoreMLP(nn.Module):
    """Noise predictor eps(x, t, cond) for vector data: an MLP on [x, cond, emb(t)]."""

    def __init__(self, dim: int, cond_dim: int = 0, hidden: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__()
        self.dim, self.cond_dim, self.time_dim = dim, cond_dim, time_dim
        self.net = MLP(dim + cond_dim + time_dim, dim, hidden, depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        parts = [x]
        if self.cond_dim:
            if cond is None:
                raise BenchError(f"this ScoreMLP is conditional: pass cond=(N, {self.cond_dim})")
            parts.append(cond.to(x.dtype))
        parts.append(timestep_embedding(t, self.time_dim).to(x.dtype))
        return self.net(torch.cat(parts, dim=1))
