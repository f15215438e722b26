"""The map and potential networks of the map-based OT methods, and the max-min problem NOT, KNOT and OTM share.

**Networks.**  Every method that learns a transport map uses one definition of its networks, so that their rows
differ by algorithm, not by architecture: on images the map is this benchmark's UNet (``bench.nn.UNet``, not
time-conditional) and the potential a ``ResNetCritic``, on the square canvas of ``bench.nn.canvas_side``; on
vectors both are MLPs.  :data:`NETWORK_OPTIONS` declares their sizes, one value per budget (NOT, KNOT, OTM and
W2GAN take them all, TCR its regressor's); :func:`map_unet`, :func:`resnet_critic` and :func:`vector_mlp` build them
from a method's resolved options.

**The max-min.**  :class:`SaddleMap` is a method whose stochastic map T(x, z) and potential f solve

    max_f  min_T   E_x [ C(x, T(x, .)) - E_z f(T(x, z)) ]  +  E_y f(y)

for the cost C(x, mu) of a point x and the conditional distribution mu = T(x, .)_# N(0, I) that a subclass
defines (``cost``): NOT's quadratic and gamma-weak quadratic costs (Korotin, Selikhanovych and Burnaev, ICLR
2023), KNOT's kernel costs (the same authors), OTM's inner-product form of the quadratic cost (Rout, Korotin and
Burnaev, ICLR 2022; a deterministic map).  The rest is common to the three and lives here: the noise z (one extra
input channel of std ``z_std``, or ``noise_dim`` values through conditional normalisation at every UNet layer;
extra dimensions on vectors), the networks, the linear warm-up of a weak cost's gamma, and Algorithm 1 of NOT's
paper, whose loop, optimisers and schedules are :class:`bench.saddle.SaddleTrainer`'s: each outer step makes
K_T = ``inner_steps`` map updates on

    L_T = E_x [ C_hat(x, T(x, Z_x)) - mean_z f(T(x, z)) ],   |Z_x| = n_z noise draws per x (1 without noise),

then one potential update on  L_f = E_x E_z f(T(x, z)) - E_y f(y)  (``critic_first`` reverses the order).
Images are padded to the canvas and cropped back after the map.
"""
from __future__ import annotations

from typing import Any

import torch

from .api import SEMI_PAIRED, UNPAIRED, BenchError, Method, TaskData
from .nn import MLP, UNet, canvas_side, crop_to, pad_to
from .nn.resnet import ResNetCritic
from .options import Option
from .saddle import SADDLE_OPTIONS, SaddleTrainer

# the networks' sizes: the UNet map and the ResNet potential on images, the MLPs on vectors
NETWORK_OPTIONS: dict[str, Any] = {
    "unet_base": Option(smoke=8, cpu=16, fast=64, paper=64),
    "unet_mults": [1, 2, 2],
    "unet_blocks": Option(smoke=1, cpu=1, fast=2, paper=2),
    "unet_attention": Option(smoke=[], cpu=[], fast=[16], paper=[16]),
    "critic_base": Option(smoke=8, cpu=16, fast=64, paper=64),
    "mlp_hidden": Option(smoke=128, cpu=256, fast=256, paper=256),
    "mlp_depth": 3,
}
# outer steps on vector tasks (NOT's and KNOT's; OTM declares its own)
VECTOR_STEPS = Option(smoke=400, cpu=2000, fast=5000, paper=10_000)
# the same networks, small enough for a contract test to train in seconds on bench.testing.tiny_images()
TEST_NETWORK_OPTIONS: dict[str, Any] = {"unet_base": 8, "unet_mults": [1, 2], "unet_blocks": 1, "unet_attention": [],
                                        "critic_base": 8, "mlp_hidden": 32, "mlp_depth": 2}


def map_unet(in_channels: int, out_channels: int, o: dict[str, Any], image_size: int, noise_dim: int = 0) -> UNet:
    """The map network on images: a UNet of ``NETWORK_OPTIONS``' sizes, not time-conditional (its output
    convolution starts at zero), taking ``noise_dim`` noise values through conditional normalisation (0: none)."""
    return UNet(in_channels, out_channels, noise_dim=noise_dim, base=o["unet_base"], mults=tuple(o["unet_mults"]),
                num_res_blocks=o["unet_blocks"], attention_resolutions=tuple(o["unet_attention"]),
                time_conditional=False, image_size=image_size)


def resnet_critic(channels: int, o: dict[str, Any], image_size: int) -> ResNetCritic:
    """The potential on images: a scalar ResNet of width ``critic_base`` on ``image_size`` x ``image_size``."""
    return ResNetCritic(channels, image_size=image_size, base=o["critic_base"])


def vector_mlp(in_features: int, out_features: int, o: dict[str, Any]) -> MLP:
    """A map or potential on vectors: ``mlp_depth`` hidden layers of width ``mlp_hidden``."""
    return MLP(in_features, out_features, hidden=o["mlp_hidden"], depth=o["mlp_depth"])


class SaddleMap(Method):
    """Base of the methods that solve the max-min above: a subclass declares its ``cost`` option (``"strong"``: a
    deterministic map without noise; any other value: a stochastic map T(x, z)), defines :meth:`cost` and sets its
    step counts; the options here are the rest of the problem's (see the module docstring)."""

    family = "OT"
    settings = (UNPAIRED, SEMI_PAIRED)
    stochastic = False  # per instance: True unless the cost is "strong"
    uses_pairs = False
    probe_loop = "saddle"
    default_options: dict[str, Any] = {
        "gamma": Option(0.66, help="weak cost: variance reward (authors' image setting)"),
        "gamma_warmup": Option(0.25, help="share of the steps over which gamma grows linearly from 0"),
        "n_z": Option(8, help="weak cost: noise samples per source in the map loss (authors: Z_SIZE 8)"),
        "noise": Option("channel", choices=("channel", "cond-norm"),
                        help="how z enters the image map: one extra input channel (NOT authors) or a "
                             "noise_dim vector through conditional normalisation at every layer (KNOT authors)"),
        "noise_dim": Option(128, help="cond-norm noise: size of z"),
        "z_std": Option(0.1, vector=1.0,
                        help="std of the noise (NOT authors: 0.1 channel; KNOT authors: 1.0 cond-norm)"),
        "cost_scale": Option(1.0, help="multiplies the cost; 1 = the authors' mse without the 1/2"),
        **SADDLE_OPTIONS,
        "steps": SADDLE_OPTIONS["steps"].on_vectors(VECTOR_STEPS),
        # smoke: about a minute on a 2-core CPU for 28x28 digits
        "batch_size": Option(smoke=16, cpu=64, fast=64, paper=64, vector=64),
        "map_lr": Option(1e-4, vector=1e-3),
        "critic_lr": Option(1e-4, vector=1e-3),
        **NETWORK_OPTIONS,
    }
    # the map, the potential and the trainer's random stream (its optimisers are registered with the method)
    state_attrs = ("T", "f", "saddle")
    # trains in a few seconds on bench.testing.tiny_images() / tiny_vectors()
    test_options: dict[str, Any] = {"steps": 6, "inner_steps": 2, "batch_size": 8, **TEST_NETWORK_OPTIONS}

    def __init__(self, budget: str = "smoke", **options: Any) -> None:
        super().__init__(budget, **options)
        self._validate()
        self.stochastic = self.options["cost"] != "strong"
        self.extra_state: dict[str, Any] = {}

    def _validate(self) -> None:
        """A one-line BenchError for options that define no problem (a subclass adds its cost's own checks)."""
        if float(self.options["gamma"]) < 0:
            raise BenchError(f"gamma must be >= 0, got {self.options['gamma']}")

    def check_setting(self, data: TaskData) -> None:
        super().check_setting(data)
        if data.source_shape != data.shape:
            raise BenchError(f"{self.name} compares a source and its image coordinate by coordinate: source "
                             f"shape {data.source_shape} must equal target shape {data.shape}; resize the task")

    # -- the cost C(x, T(x, .)): the subclass's ----------------------------------------------
    def cost(self, x: torch.Tensor, ys: torch.Tensor, gamma: float) -> torch.Tensor:
        """An estimate of C(x, mu) for each x (B, ...) from samples ys (B, n, ...) of mu = T(x, .)."""
        raise NotImplementedError

    def gamma_at(self, step: int) -> float:
        """The cost's gamma at an outer step: linear warm-up from 0, then constant (0 for the strong cost)."""
        gamma, warm = float(self.options["gamma"]), float(self.options["gamma_warmup"])
        if self.options["cost"] == "strong":
            return 0.0
        ramp = warm * self.saddle.steps
        return gamma if ramp <= 0 else gamma * min(1.0, step / ramp)

    # -- networks ----------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        """Samples T(x, z) per source in the map loss (1 for the deterministic map)."""
        return int(self.options["n_z"]) if self.stochastic else 1

    def setup(self, data: TaskData, run) -> None:
        self.check_kind(data)
        o = self.options
        self.shape = data.shape
        self.z_std = float(o["z_std"])
        if data.is_image:
            c, h, w = data.shape
            self.canvas = canvas_side(h, w)
            self.z_shape = (1, self.canvas, self.canvas) if self.stochastic else None
            self.cond_norm = self.stochastic and o["noise"] == "cond-norm"
            channel = self.stochastic and not self.cond_norm
            if self.cond_norm:
                self.z_shape = (int(o["noise_dim"]),)
            self.T = map_unet(c + (1 if channel else 0), c, o, self.canvas,
                              noise_dim=int(o["noise_dim"]) if self.cond_norm else 0)
            self.f = resnet_critic(c, o, self.canvas)
        else:
            (dim,) = data.shape
            self.z_shape = (dim,) if self.stochastic else None
            self.T = vector_mlp(dim + (dim if self.stochastic else 0), dim, o)
            self.f = vector_mlp(dim, 1, o)
        self.batch_size = o["batch_size"]
        self.saddle = SaddleTrainer.from_options(self.T.parameters(), self.f.parameters(), o, run, method=self)

    def _to_canvas(self, x: torch.Tensor) -> torch.Tensor:
        return pad_to(x, self.canvas) if self.is_image else x

    def _from_canvas(self, y: torch.Tensor) -> torch.Tensor:
        return crop_to(y, *self.shape[-2:]).clamp(-1, 1) if self.is_image else y

    def _noise(self, n: int, device, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(n, *self.z_shape, generator=generator, device=device) * self.z_std

    def map(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """T(x, z) on the working canvas, one fresh z per row (none for the deterministic map)."""
        if self.stochastic and getattr(self, "cond_norm", False):
            return self.T(x, z=self._noise(x.shape[0], x.device, generator).to(x.dtype))
        if self.stochastic:
            x = torch.cat([x, self._noise(x.shape[0], x.device, generator).to(x.dtype)], dim=1)
        return self.T(x)

    # -- Algorithm 1 of NOT's paper ------------------------------------------------------------
    def fit(self, data: TaskData, run) -> None:
        source = self._to_canvas(data.source_train.to(run.device))
        target = self._to_canvas(data.target_train.to(run.device))
        B, n, saddle = int(self.batch_size), self.n_samples, self.saddle

        def critic_loss(step: int):
            # L_f = E_x E_z f(T(x, z)) - E_y f(y): the potential's side of the max-min
            with torch.no_grad():
                fake = self.map(saddle.batch(source, B), saddle.generator)
            return self.f(fake).mean() - self.f(saddle.batch(target, B)).mean()

        def map_loss(step: int):
            # L_T = E_x [ C_hat(x, T(x, Z_x)) - mean_z f(T(x, z)) ], |Z_x| = n noise draws per x
            x = saddle.batch(source, B)
            y = self.map(x.repeat_interleave(n, dim=0), saddle.generator)
            gamma = self.gamma_at(step)
            cost = self.cost(x, y.view(B, n, *y.shape[1:]), gamma).mean()
            return cost - self.f(y).mean(), {"cost": cost, "gamma": gamma}

        saddle.fit(run, "saddle", map_loss=map_loss, critic_loss=critic_loss,
                   log_every=int(self.options["log_every"]))

    @torch.no_grad()
    def transport(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._from_canvas(self.map(self._to_canvas(x), generator)).float()
