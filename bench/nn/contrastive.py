"""A label-free learned feature space for images: a small CNN trained contrastively (SimCLR, Chen et al. 2020).

Two random geometric distortions of each image are embedded; the NT-Xent loss pulls the two views of an image
together and pushes the other images of the batch away. No label is read: the encoder learns what stays the
same under small rotations, shears, scalings and shifts, which on handwritten numerals is mostly their identity.
OTCS can compare images (and their relation vectors to the guiding keypoints) in this space instead of pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def distort(x: torch.Tensor, g: torch.Generator, rot_deg: float = 15.0, scale: tuple[float, float] = (0.8, 1.15),
            shear: float = 0.2, shift: float = 0.12, noise: float = 0.1) -> torch.Tensor:
    """One random affine distortion per image (N, C, H, W in [-1, 1], background -1) plus pixel noise."""
    n, dev = x.shape[0], x.device

    def uniform(lo, hi):
        return torch.rand(n, generator=g, device=dev) * (hi - lo) + lo
    a = uniform(-rot_deg, rot_deg) * math.pi / 180
    s = torch.exp(uniform(math.log(scale[0]), math.log(scale[1])))
    sh = uniform(-shear, shear)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + sh * cos
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos + sh * sin
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-shift, shift), uniform(-shift, shift)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # background stays -1
    return (out + noise * torch.randn(out.shape, generator=g, device=dev)).clamp(-1, 1)


class Encoder(nn.Module):
    """Conv features -> ``dim``-d representation (the features used downstream) and a projection head (the loss's)."""

    def __init__(self, in_ch: int = 1, width: int = 16, dim: int = 128, proj: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2N - 1 other views of the batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def train_encoder(x: torch.Tensor, steps: int = 2000, batch: int = 256, lr: float = 1e-3, seed: int = 0,
                  device: torch.device | str = "cpu", log=None, **enc_kw) -> Encoder:
    """Fit an :class:`Encoder` to the images ``x`` (N, C, H, W in [-1, 1]) without labels; returns it in eval mode.
    Each batch is ``batch`` distinct images (a repeated image would be its own negative). On the CPU the result
    is a function of ``seed`` (it seeds torch's global generator for the initial weights, then draws batches and
    distortions from generators of its own); on CUDA grid_sample's backward is not deterministic."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    enc = Encoder(in_ch=x.shape[1], **enc_kw).to(dev)
    opt = torch.optim.Adam(enc.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator(device=dev).manual_seed(seed)
    gi = torch.Generator().manual_seed(seed)
    enc.train()
    for step in range(steps):
        xb = x[torch.randperm(len(x), generator=gi)[:batch]].to(dev)
        loss = nt_xent(enc.head(enc(distort(xb, g))), enc.head(enc(distort(xb, g))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(step, loss.item())
    return enc.eval()


@torch.no_grad()
def embed(enc: Encoder, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Unit-norm representations of ``x`` (N, dim), in batches, on ``x``'s device."""
    dev = next(enc.parameters()).device
    return torch.cat([F.normalize(enc(x[i:i + batch].to(dev)).float(), dim=1).to(x.device)
                      for i in range(0, len(x), batch)])
