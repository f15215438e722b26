"""OTM: generative modeling with optimal transport maps (Rout, Korotin and Burnaev, ICLR 2022).

OTM learns a deterministic map T from P to Q as the solution of the max-min problem

    max_psi  min_T   E_x [ -<Q(x), T(x)> / D + psi(T(x)) ]  -  E_y psi(y)        (their eq. 10),

the quadratic cost ||Q(x) - y||^2 / 2 written as the inner product -<Q(x), y> (the ||y||^2 part
belongs to the potential), per coordinate as the authors' ``torch.mean(Q(x) * G(x))``.  Q is the
paper's fixed embedding of the source space into the target space when their dimensions differ
(:func:`embed`: bicubic resizing and channel repetition for images, as their latent -> 32x32 MNIST
script; zero padding for vectors), the identity when they agree; T acts on Q(x).

It is the same saddle problem as strong NOT (methods/not_.py) with f = -psi, so this class is NOT's
max-min (bench.mapmodel.SaddleMap: networks, loop, optimisers) with four differences, and only those
are code here:

- the cost is the inner product -<Q(x), T(x)> / D, not NOT's ||x - T(x)||^2 / D (same optimal map,
  a different split between cost and potential, so a different function for the critic to learn);
- the map's output ends in tanh on images, as the authors' (``map_head``): with the inner-product cost
  the map's objective is linear in T, and only a bound keeps T in the pixel range;
- the authors' update order and settings: one potential update first, then K_G = 5 map updates
  (their restoration scripts; 2 in their MNIST generation script), Adam betas (0, 0.9) at lr 1e-4;
- the optional gradient-optimality penalty on the potential (``lambda_go``; authors: 10 for MNIST
  generation, 0 for restoration): at the optimum grad_y of the map's objective vanishes at y = T(x),
  i.e. grad f(T(x)) = -cost_scale Q(x) / D, and the penalty is the norm of the batch mean of the gap.

Networks are NOT's shared UNet map and ResNet critic (the authors use their own ResNet generator
and NCSN-style critic): the architectural difference is theirs, not a choice of this benchmark.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.api import BenchError, Method, TaskData
from bench.mapmodel import SaddleMap
from bench.nn.icnn import input_gradient
from bench.options import Option


def embed(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """OTM's embedding Q of source rows into the target space ``shape`` (the identity when it is theirs)."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if x.dim() == 2:  # vectors: zero padding (or truncation) to the target dimension
        d = shape[0]
        return F.pad(x, (0, d - x.shape[1])) if d >= x.shape[1] else x[:, :d]
    c, h, w = shape
    y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False) if x.shape[-2:] != (h, w) else x
    if y.shape[1] != c:
        y = y.mean(1, keepdim=True) if c == 1 else y.expand(-1, c, -1, -1)
    return y


class TanhHead(torch.nn.Module):
    """net(x) squashed into (-1, 1): the pixel range of the target images."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tanh(self.net(x, **kwargs))


class OTM(SaddleMap):
    name = "otm"
    family = "OT"
    stochastic = False
    paper = "Rout, Korotin, Burnaev. Generative Modeling with Optimal Transport Maps. ICLR 2022"
    probe_every = {"cpu": 100}
    readme_label = "OTM (550 potential updates)"
    readme_grids = "dimmed copies of the inputs"
    readme_order = 7
    notes = ("unpaired: on semi-paired tasks the guiding pairs are ignored; strong NOT's saddle problem with the "
             "cost as -<Q(x), T(x)>/D, the potential updated first then K_G = 5 map steps, Adam betas (0, 0.9), "
             "optional gradient-optimality penalty; embedding Q (bicubic / channel repeat / zero pad) when source "
             "and target shapes differ; NOT's UNet map and ResNet critic instead of the authors' networks; NOT's "
             "weak-cost options are inert")
    default_options: dict[str, Any] = {
        "cost": Option("strong", choices=("strong",), help="a deterministic map (OTM has no weak cost)"),
        **SaddleMap.default_options,
        "map_head": Option("tanh", choices=("tanh", "linear"),
                           help="images: the map's output squashed by tanh into the pixel range, or left linear "
                                "(NOT's UNet); vectors are always linear",
                           authors="tanh", source="LituRout/OptimalTransportModeling source/otm_mnist_32x32.py, "
                                                  "otm_celeba_denoise_64x64.py (TransportMap ends in nn.Tanh)"),
        "lambda_go": Option(0.0, help="gradient-optimality penalty (authors: 0 for restoration, 10 for generation)"),
        "inner_steps": Option(5, help="K_G: map updates per potential update (authors' restoration: 5)"),
        "critic_first": Option(True, help="the potential is updated first (authors)"),
        "betas": Option([0.0, 0.9], help="Adam betas (authors: 0, 0.9)"),
        "weight_decay": 0.0,
        # one outer step = 1 potential + K_G = 5 map updates
        # cpu: sized so that the whole run (fit + transport + evaluation) stays within the 45-minute cap on a 2-core
        # CPU; each row records its measured minutes per stage (`timings`), studies/cpu_perf has the step costs
        # vectors: the inner-product cost converges more slowly than NOT's on toy1d (300 steps: T(-4) = 3.1)
        "steps": Option(smoke=24, cpu=550, fast=8000, paper=95_000,
                        vector=Option(smoke=1000, cpu=3000, fast=5000, paper=10_000),
                        help="potential updates (authors' MNIST script: 101 epochs of 937 batches)"),
    }
    test_options: dict[str, Any] = {**SaddleMap.test_options, "steps": 3}
    # rows stored before ``map_head`` existed had NOT's linear output
    options_before = {"map_head": "linear"}
    compared_against = ("LituRout/OptimalTransportModeling @8287054 (source/otm_mnist_32x32.py, "
                        "source/otm_celeba_denoise_64x64.py); ICLR 2022 paper eq. 10")
    deviations = (
        "networks: NOT's UNet map and ResNet critic (no normalisation) vs the authors' ResNet generator and "
        "conv/avg-pool (restoration) or NCSN-style (MNIST) critic: one map network for every map-based method",
        "gradient-optimality penalty compares grad f with cost_scale Q(x) / D (the per-coordinate cost's "
        "gradient) where the authors omit 1/D; off by default, as the authors' restoration runs",
    )

    def setup(self, data: TaskData, run) -> None:
        super().setup(data, run)
        if data.is_image and self.options["map_head"] == "tanh":
            self.T = TanhHead(self.T)  # the same parameters, already handed to the saddle trainer

    def check_setting(self, data: TaskData) -> None:
        Method.check_setting(self, data)  # differing shapes are what Q is for (SaddleMap.check_setting refuses them)
        if data.source_train.dim() != data.target_train.dim():
            raise BenchError(f"{self.name} embeds images into images and vectors into vectors; source "
                             f"{data.source_shape} and target {data.shape} are not both one kind")
        if data.is_image and data.source_shape[0] not in (1, data.shape[0]) and data.shape[0] != 1:
            raise BenchError(f"{self.name}'s embedding repeats one channel or averages to one: source channels "
                             f"{data.source_shape[0]} cannot become {data.shape[0]}; convert the task's images")

    def _to_canvas(self, x: torch.Tensor) -> torch.Tensor:
        return super()._to_canvas(embed(x, self.shape))  # targets pass through embed unchanged

    # -- the inner-product form of the quadratic cost -------------------------------------
    def cost(self, x: torch.Tensor, ys: torch.Tensor, gamma: float) -> torch.Tensor:
        """-<Q(x), y> / D per source (x already embedded), times ``cost_scale``; ys is (B, 1, ...)."""
        dot = (ys * x.unsqueeze(1)).flatten(2).mean(2).mean(1)
        return -float(self.options["cost_scale"]) * dot

    def go_penalty(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """|| mean_x grad f(T(x)) + cost_scale mean_x Q(x) / D ||: the map's optimality condition, batch-averaged."""
        k = float(self.options["cost_scale"]) / x[0].numel()
        grad = input_gradient(self.f, t, create_graph=True)
        return (grad.mean(0) + k * x.mean(0)).norm()

    def fit(self, data: TaskData, run) -> None:
        lam = float(self.options["lambda_go"])
        if lam == 0:
            return super().fit(data, run)  # NOT's two losses (SaddleMap), with this cost and these settings
        # the penalty needs the potential's loss to see the sources; the map's loss is NOT's
        source = self._to_canvas(data.source_train.to(run.device))
        target = self._to_canvas(data.target_train.to(run.device))
        B, saddle = int(self.batch_size), self.saddle

        def potential_loss(step: int):
            x = saddle.batch(source, B)
            with torch.no_grad():
                t = self.map(x)
            go = self.go_penalty(x, t)
            return self.f(t).mean() - self.f(saddle.batch(target, B)).mean() + lam * go, {"go": go}

        def map_loss(step: int):
            x = saddle.batch(source, B)
            t = self.map(x)
            c = self.cost(x, t.unsqueeze(1), 0.0).mean()
            return c - self.f(t).mean(), {"cost": c}

        saddle.fit(run, "saddle", map_loss=map_loss, critic_loss=potential_loss,
                   log_every=int(self.options["log_every"]))
