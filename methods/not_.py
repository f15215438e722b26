"""NOT: Neural Optimal Transport (Korotin, Selikhanovych and Burnaev, ICLR 2023).

NOT learns a (stochastic) transport map T(x, z) from source P to target Q as the solution of
the max-min problem (their eq. 9, Algorithm 1)

    max_f  min_T   E_x [ C(x, T(x, .)) - E_z f(T(x, z)) ]  +  E_y f(y),

where f is a potential on the target space, z ~ N(0, z_std^2) is noise fed to T as extra input
channels (images) or extra dimensions (vectors), and C(x, mu) is a *weak* cost of a point x and
the conditional distribution mu = T(x, .)_# N(0, I):

- ``cost="strong"``: the quadratic cost  C(x, y) = ||x - y||^2 / D  of a deterministic map
  (T takes no noise);
- ``cost="weak"``: the gamma-weak quadratic cost
      C_gamma(x, mu) = (E_{y~mu} ||x - y||^2 - gamma Var(mu)) / D,
  estimated without bias from ``n_z`` samples T(x, z_1..n) per x with the unbiased variance.
  A larger gamma rewards more diverse T(x, .); gamma warms up linearly from 0 over the first
  ``gamma_warmup`` fraction of the steps, as in the authors' image experiments.

Costs are the authors' mean squared error per coordinate (their ``F.mse_loss``, no 1/2; the
option ``cost_scale`` multiplies it), a constant factor of the cost that leaves the optimal plan
unchanged but sets the balance against the critic.  As in the authors' Algorithm 1, each outer
step makes K_T map updates and then one critic update (``critic_first`` reverses it), with Adam
at torch's default betas and weight decay 1e-10.

The saddle loop (optimisers, K_T = ``inner_steps`` map steps per potential step, schedules,
logging, resumable state) is :class:`bench.saddle.SaddleTrainer`; this file holds only what is
NOT's: its networks, its cost and its two losses.  KNOT (methods/knot.py) is this class with a
kernel cost.
"""
from __future__ import annotations

from typing import Any

import torch

from bench.api import SEMI_PAIRED, UNPAIRED, BenchError, Method, TaskData
from bench.nn import canvas_side, MLP, UNet, crop_to, pad_to
from bench.nn.resnet import ResNetCritic
from bench.options import Option
from bench.saddle import SADDLE_OPTIONS, SaddleTrainer

COSTS = ("strong", "weak")



class NOT(Method):
    name = "not"
    family = "OT"
    settings = (UNPAIRED, SEMI_PAIRED)
    stochastic = False  # per instance: True with cost="weak"
    uses_pairs = False
    paper = "Korotin, Selikhanovych, Burnaev. Neural Optimal Transport. ICLR 2023"
    probe_loop = "saddle"
    notes = ("unpaired: on semi-paired tasks the guiding pairs are ignored; cost='strong' (deterministic "
             "map, default) or 'weak' (gamma-weak quadratic cost, stochastic map T(x, z)); UNet map and "
             "ResNet potential on images padded to a power-of-two canvas, MLPs on vectors; costs divided by "
             "the data dimension")
    default_options: dict[str, Any] = {
        "cost": Option("strong", choices=COSTS),
        "gamma": Option(0.66, help="weak cost: variance reward (authors' image setting)",
                authors=0.66, source='iamalexkorotin/NeuralOptimalTransport notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb (GAMMA, weak cost)'),
        "gamma_warmup": Option(0.25, help="share of the steps over which gamma grows linearly from 0"),
        "n_z": Option(8, help="weak cost: noise samples per source in the map loss (authors: Z_SIZE 8)",
                authors=8, source='iamalexkorotin/NeuralOptimalTransport notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb (Z_SIZE)'),
        "noise": Option("channel", choices=("channel", "cond-norm"),
                        help="how z enters the image map: one extra input channel (NOT authors) or a "
                             "noise_dim vector through conditional normalisation at every layer (KNOT authors)"),
        "noise_dim": Option(128, help="cond-norm noise: size of z"),
        "z_std": Option(0.1, help="std of the noise (NOT authors: 0.1 channel; KNOT authors: 1.0 cond-norm)"),
        "toy_z_std": 1.0,
        "cost_scale": Option(1.0, help="multiplies the cost; 1 = the authors' mse without the 1/2"),
        **SADDLE_OPTIONS,
        # images (toy_* on vector tasks); smoke: about a minute on a 2-core CPU for 28x28 digits
        # cpu: one outer step = K_T = 10 map steps + 1 critic step; 200 steps left the map a dimmed copy of its
        # input with the critic still improving, so 600
        # cpu: sized so that the whole run (fit + transport + evaluation) stays within the 45-minute cap on a 2-core
        # CPU; each row records its measured minutes per stage (`timings`), studies/cpu_perf has the step costs
        "steps": Option(smoke=24, cpu=600, fast=4000, paper=100_000, help="outer steps (authors: 100k)",
                authors=100000, source='iamalexkorotin/NeuralOptimalTransport notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb (MAX_STEPS 100k)'),
        "batch_size": Option(smoke=16, cpu=64, fast=64, paper=64),
        "toy_steps": Option(smoke=400, cpu=2000, fast=5000, paper=10_000),
        "toy_batch_size": 64,
        "toy_lr": 1e-3,
        "unet_base": Option(smoke=8, cpu=16, fast=64, paper=64),
        "unet_mults": [1, 2, 2],
        "unet_blocks": Option(smoke=1, cpu=1, fast=2, paper=2),
        "unet_attention": Option(smoke=[], cpu=[], fast=[16], paper=[16]),
        "critic_base": Option(smoke=8, cpu=16, fast=64, paper=64),
        "mlp_hidden": Option(smoke=128, cpu=256, fast=256, paper=256),
        "mlp_depth": 3,
    }
    # trains in a few seconds on bench.testing.tiny_images() / tiny_vectors()
    compared_against = 'iamalexkorotin/NeuralOptimalTransport (notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb; src/resnet2.py, src/unet.py)'
    deviations = (
        "no MNIST experiment in the authors' code: images padded 28 -> 32 so the UNet and the ResNet critic's levels divide",
        "map network: this benchmark's DDPM-style UNet (GroupNorm, nearest upsampling) vs the authors' milesial UNet (BatchNorm, bilinear, base 48); the critic is a ResNet like theirs",
        "vectors: MLPs of width 256 and depth 3 (the authors' toys 100-100-100) at lr 1e-3",
    )
    test_options: dict[str, Any] = {"steps": 6, "toy_steps": 6, "inner_steps": 2, "batch_size": 8,
                                    "toy_batch_size": 8, "unet_base": 8,
                                    "unet_mults": [1, 2], "unet_blocks": 1, "unet_attention": [],
                                    "critic_base": 8, "mlp_hidden": 32, "mlp_depth": 2}

    def __init__(self, budget: str = "smoke", **options: Any) -> None:
        super().__init__(budget, **options)
        self._validate()
        self.stochastic = self.options["cost"] != "strong"
        self.extra_state: dict[str, Any] = {}

    def _validate(self) -> None:
        o = self.options
        if o["cost"] == "weak" and int(o["n_z"]) < 2:
            raise BenchError("the weak cost's unbiased variance needs n_z >= 2 noise samples per source")
        if float(o["gamma"]) < 0:
            raise BenchError(f"gamma must be >= 0, got {o['gamma']}")

    def check_setting(self, data: TaskData) -> None:
        super().check_setting(data)
        if data.source_shape != data.shape:
            raise BenchError(f"{self.name} compares a source and its image coordinate by coordinate: source "
                             f"shape {data.source_shape} must equal target shape {data.shape}; resize the task")

    # -- the cost C(x, T(x, .)) --------------------------------------------------------------
    def cost(self, x: torch.Tensor, ys: torch.Tensor, gamma: float) -> torch.Tensor:
        """Unbiased estimate of C(x, mu) for each x (B, ...) from samples ys (B, n, ...) of mu."""
        d = (ys - x.unsqueeze(1)).flatten(2)
        k = float(self.options["cost_scale"])
        transport = d.pow(2).mean(2).mean(1)  # E ||x - y||^2 / D (the authors' mse, no 1/2)
        if ys.shape[1] == 1 or gamma == 0:
            return k * transport
        var = ys.flatten(2).var(dim=1, unbiased=True).mean(1)  # Var(mu) / D, unbiased over the n samples
        return k * (transport - gamma * var)

    def gamma_at(self, step: int) -> float:
        """The cost's gamma at an outer step: linear warm-up from 0, then constant."""
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
        o = self.options
        self.is_image = data.is_image
        self.shape = data.shape
        if data.is_image:
            c, h, w = data.shape
            self.canvas = canvas_side(h, w)
            self.z_shape = (1, self.canvas, self.canvas) if self.stochastic else None
            self.z_std = float(o["z_std"])
            self.cond_norm = self.stochastic and o["noise"] == "cond-norm"
            channel = self.stochastic and not self.cond_norm
            if self.cond_norm:
                self.z_shape = (int(o["noise_dim"]),)
            self.T = UNet(c + (1 if channel else 0), c, noise_dim=int(o["noise_dim"]) if self.cond_norm else 0,
                          base=o["unet_base"], mults=tuple(o["unet_mults"]),
                          num_res_blocks=o["unet_blocks"],
                          attention_resolutions=tuple(o["unet_attention"]), time_conditional=False,
                          image_size=self.canvas)
            self.f = ResNetCritic(c, image_size=self.canvas, base=o["critic_base"])
            self.batch_size = o["batch_size"]
            steps, lr = o["steps"], o["map_lr"]
        else:
            (dim,) = data.shape
            self.z_shape = (dim,) if self.stochastic else None
            self.z_std = float(o["toy_z_std"])
            hidden = o["mlp_hidden"]
            self.T = MLP(dim + (dim if self.stochastic else 0), dim, hidden=hidden, depth=o["mlp_depth"])
            self.f = MLP(dim, 1, hidden=hidden, depth=o["mlp_depth"])
            self.batch_size = o["toy_batch_size"]
            steps, lr = o["toy_steps"], o["toy_lr"]
        critic_lr = o["critic_lr"] if data.is_image else lr
        resolved = {**o, "steps": steps, "map_lr": lr, "critic_lr": critic_lr}
        self.saddle = SaddleTrainer.from_options(self.T.parameters(), self.f.parameters(), resolved, run, method=self)

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

    # -- Algorithm 1 -------------------------------------------------------------------------
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
