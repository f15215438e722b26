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

The max-min's loop (Algorithm 1: K_T = ``inner_steps`` map steps per potential step, the noise, the
networks, the gamma warm-up) is :class:`bench.mapmodel.SaddleMap`, shared with KNOT (methods/knot.py:
a kernel cost) and OTM (methods/otm.py: the inner-product form of the strong cost); this file holds
only what is NOT's: its two costs and its authors' settings.
"""
from __future__ import annotations

from typing import Any

import torch

from bench.api import BenchError
from bench.mapmodel import VECTOR_STEPS, SaddleMap
from bench.options import Option

COSTS = ("strong", "weak")


class NOT(SaddleMap):
    name = "not"
    paper = "Korotin, Selikhanovych, Burnaev. Neural Optimal Transport. ICLR 2023"
    probe_every = {"cpu": 20}
    probe_n = 500
    readme_label = "NOT (600 outer steps)"
    readme_grids = "dimmed, smeared copies of the inputs"
    readme_order = 3
    notes = ("unpaired: on semi-paired tasks the guiding pairs are ignored; cost='strong' (deterministic "
             "map, default) or 'weak' (gamma-weak quadratic cost, stochastic map T(x, z)); UNet map and "
             "ResNet potential on images padded to a power-of-two canvas, MLPs on vectors; costs divided by "
             "the data dimension")
    default_options: dict[str, Any] = {
        "cost": Option("strong", choices=COSTS),
        **SaddleMap.default_options,
        # the authors' values (their image experiments)
        "gamma": Option(0.66, help="weak cost: variance reward (authors' image setting)",
                authors=0.66, source='iamalexkorotin/NeuralOptimalTransport notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb (GAMMA, weak cost)'),
        "n_z": Option(8, help="weak cost: noise samples per source in the map loss (authors: Z_SIZE 8)",
                authors=8, source='iamalexkorotin/NeuralOptimalTransport notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb (Z_SIZE)'),
        # cpu: one outer step = K_T = 10 map steps + 1 critic step; 200 steps left the map a dimmed copy of its
        # input with the critic still improving, so 600
        # cpu: sized so that the whole run (fit + transport + evaluation) stays within the 45-minute cap on a 2-core
        # CPU; each row records its measured minutes per stage (`timings`), studies/cpu_perf has the step costs
        "steps": Option(smoke=24, cpu=600, fast=4000, paper=100_000, vector=VECTOR_STEPS, help="outer steps (authors: 100k)",
                authors=100000, source='iamalexkorotin/NeuralOptimalTransport notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb (MAX_STEPS 100k)'),
    }
    compared_against = 'iamalexkorotin/NeuralOptimalTransport (notebooks/NOT_training_strong.ipynb, NOT_training_weak.ipynb; src/resnet2.py, src/unet.py)'
    deviations = (
        "no MNIST experiment in the authors' code: images padded 28 -> 32 so the UNet and the ResNet critic's levels divide",
        "map network: this benchmark's DDPM-style UNet (GroupNorm, nearest upsampling) vs the authors' milesial UNet (BatchNorm, bilinear, base 48); the critic is a ResNet like theirs",
        "vectors: MLPs of width 256 and depth 3 (the authors' toys 100-100-100) at lr 1e-3",
    )

    def _validate(self) -> None:
        if self.options["cost"] == "weak" and int(self.options["n_z"]) < 2:
            raise BenchError("the weak cost's unbiased variance needs n_z >= 2 noise samples per source")
        super()._validate()

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
