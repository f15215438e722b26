"""A compact DDPM-style UNet (Ho et al. 2020; Song et al. 2021) shared by every image method.

Layout: a 3x3 input convolution, then per resolution level ``num_res_blocks`` residual blocks
(GroupNorm -> SiLU -> conv, twice; the embedding vector sets a per-channel scale and shift
of the second GroupNorm's output),
self-attention at the resolutions listed in ``attention_resolutions``, and a stride-2
convolution down to the next level; a middle block (res, attention, res); a mirrored up path
whose residual blocks consume the skip activations of the down path, nearest-neighbour
upsampling followed by a convolution; GroupNorm -> SiLU -> 3x3 output convolution.

The *embedding* fed to every residual block is the sum of
- the sinusoidal time embedding of ``t`` passed through a two-layer MLP (``time_conditional``),
- for ``cond_mode="embed"``, a vector computed from the conditioning image by a small CNN,
- for ``noise_dim > 0``, a noise vector z (N, noise_dim) through a two-layer MLP: z then sets the
  scale and shift of every residual block's normalisation (conditional normalisation at every
  layer, the noise injection of the KNOT authors' map).
With neither, the residual blocks have no embedding input and the network is a plain
image-to-image map (e.g. NOT's transport map or a critic trunk).  ``cond_mode="concat"``
concatenates the conditioning image to the input channels (pixel-aligned tasks).

All operations are convolutions, GroupNorm, SiLU and ``scaled_dot_product_attention`` so the
network runs in ``torch.channels_last`` memory format and under bf16 autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BenchError

COND_MODES = ("none", "concat", "embed")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous times ``t`` in [0, 1] (scaled by 1000), shape (N, dim)."""
    t = t.reshape(-1).float() * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(channels: int) -> int:
    """GroupNorm groups: at most 32 and at least 4 channels per group where possible."""
    for g in range(max(1, min(32, channels // 4)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        # the embedding modulates the normalised activations (scale and shift, as in improved
        # DDPM / ADM): an additive per-channel constant alone would be removed by GroupNorm
        self.emb = nn.Linear(emb_dim, 2 * cout) if emb_dim > 0 else None
        self.norm2 = _norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].to(h.dtype).chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (heads of 64 channels, at least one)."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = max(1, channels // 64)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb=None) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (N, heads, HW, c/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CondEncoder(nn.Module):
    """Small CNN: conditioning image -> vector (added to the time embedding in 'embed' mode)."""

    def __init__(self, cin: int, base: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, base, 3, padding=1), nn.SiLU(),
            nn.Conv2d(base, 2 * base, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * base, 2 * base, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * base * 16, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, c):
        return self.net(c)


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, base: int = 64, mults=(1, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions=(16,), dropout: float = 0.0,
                 cond_mode: str = "none", cond_channels: int = 0, time_conditional: bool = True,
                 image_size: int = 32, noise_dim: int = 0):
        super().__init__()
        if cond_mode not in COND_MODES:
            raise BenchError(f"UNet cond_mode must be one of {COND_MODES}, got {cond_mode!r}")
        if cond_mode != "none" and cond_channels <= 0:
            raise BenchError(f"UNet cond_mode={cond_mode!r} needs cond_channels > 0")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.cond_mode, self.cond_channels = cond_mode, cond_channels
        self.time_conditional = time_conditional
        self.mults = tuple(mults)
        self.image_size = image_size
        self.base = base

        emb_dim = 4 * base if (time_conditional or cond_mode == "embed" or noise_dim > 0) else 0
        self.emb_dim = emb_dim
        self.noise_dim = int(noise_dim)
        self.noise_mlp = (nn.Sequential(nn.Linear(noise_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                          if noise_dim > 0 else None)
        if time_conditional:
            self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_encoder = CondEncoder(cond_channels, base, emb_dim) if cond_mode == "embed" else None

        cin = in_channels + (cond_channels if cond_mode == "concat" else 0)
        self.conv_in = nn.Conv2d(cin, base, 3, padding=1)

        self.down = nn.ModuleList()
        skip_ch = [base]
        ch, res = base, image_size
        for level, mult in enumerate(self.mults):
            cout = base * mult
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, cout, emb_dim, dropout)]
                ch = cout
                if res in attention_resolutions:
                    blocks.append(AttnBlock(ch))
                self.down.append(nn.ModuleList(blocks))
                skip_ch.append(ch)
            if level != len(self.mults) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_ch.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.mults))):
            cout = base * mult
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_ch.pop(), cout, emb_dim, dropout)]
                ch = cout
                if res in attention_resolutions:
                    blocks.append(AttnBlock(ch))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                res *= 2

        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels, 3, padding=1))

    def _embedding(self, x, t, cond, z=None):
        emb = None
        if self.time_conditional:
            if t is None:
                raise BenchError("this UNet is time-conditional: call it as net(x, t) with t in [0, 1]")
            t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
            if t.dim() == 0 or t.numel() == 1:
                t = t.reshape(1).expand(x.shape[0])
            emb = self.time_mlp(timestep_embedding(t, self.base))
        if self.cond_encoder is not None:
            c = self.cond_encoder(cond)
            emb = c if emb is None else emb + c
        if self.noise_mlp is not None:
            if z is None or z.shape != (x.shape[0], self.noise_dim):
                raise BenchError(f"this UNet injects noise: pass z=(N, {self.noise_dim})")
            e = self.noise_mlp(z.to(x.dtype))
            emb = e if emb is None else emb + e
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> torch.Tensor:
        div = 2 ** (len(self.mults) - 1)
        if x.shape[-1] % div or x.shape[-2] % div:
            raise BenchError(f"UNet input H, W must be divisible by {div}; pad with bench.nn.pad_to first")
        if self.cond_mode != "none":
            if cond is None:
                raise BenchError(f"this UNet has cond_mode={self.cond_mode!r}: pass cond=(N, {self.cond_channels}, H, W)")
            if cond.shape[1] != self.cond_channels:
                raise BenchError(f"UNet cond has {cond.shape[1]} channels, expected {self.cond_channels}")
        emb = self._embedding(x, t, cond, z)
        if self.cond_mode == "concat":
            if cond.shape[-2:] != x.shape[-2:]:
                raise BenchError("cond_mode='concat' needs cond with the same H, W as x; resize the condition first")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
