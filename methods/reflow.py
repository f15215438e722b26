"""Rectified flow (Liu, Gong & Liu, ICLR 2023) as a translator from the source to the target domain.

The algorithm, top to bottom:

1. **1-rectified flow.**  Draw x0 from the source and x1 from the target *independently* and fit a
   velocity field v(x, t) by the rectified-flow (flow-matching) loss
       E_{t ~ U[0,1]} || (x1 - x0) - v(t x1 + (1 - t) x0, t) ||^2
   (``bench.ode.flow_matching_loss``; a UNet on images, an MLP on vectors, EMA of the weights).
2. **Reflow** (``reflow`` = k extra rounds, 0 by default: the 1-rectified flow).  Round r pushes
   ``reflow_pairs`` source training samples through the current flow, giving coupled pairs
   (x0, Z1(x0)), and fine-tunes v on them with the same loss (the authors continue from the
   previous flow's weights).  Each round makes the paths straighter, so fewer Euler steps suffice.
3. **Straightness** after every round: S = E_k E || (Z1 - Z0) - v(Z_{t_k}, t_k) ||^2 along the Euler
   path of held source samples (``bench.ode.straightness``; 0 for straight paths), reported as
   ``bound_straightness_round<r>`` and ``bound_straightness`` (the last round's).
4. **Translation**: the ODE dZ/dt = v(Z, t) from Z0 = x (the source) at t = 0 to t = 1 by Euler
   (the paper's sampler for few steps; Heun on option), NFE = ``ode_steps`` (x2 for Heun).

Guiding pairs are unused (semi-paired tasks are accepted).  Source and target must have one shape
(the interpolation x_t mixes them).
"""
from __future__ import annotations

from typing import Any

import torch

from bench import ode
from bench.api import SEMI_PAIRED, UNPAIRED, BenchError, Method, TaskData
from bench.diffusion import EMA, in_rows
from bench.options import Option
from bench.scoremodel import (check_same_shape, fit_network, from_canvas, network, network_options, setting,
                              tiny_options, to_canvas, training_options)


class ReFlow(Method):
    name = "reflow"
    family = "Flow"
    settings = (UNPAIRED, SEMI_PAIRED)
    stochastic = False
    uses_pairs = False
    paper = ("Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified "
             "Flow. ICLR 2023")
    probe_loop = "reflow-round0"
    notes = ("1-rectified flow on independent (source, target) pairs, translation by an Euler ODE from the "
             "source; reflow=k adds k rounds on generated pairs (fine-tuned from the previous flow) and "
             "reports each round's straightness. Guiding pairs unused. The authors' image-translation code "
             "is unreleased, so paper-budget counts are their CIFAR-10 generation config's; UNet/MLP velocity "
             "field with EMA")
    default_options: dict[str, Any] = {
        **network_options(),
        # cpu, measured on this 2-core machine (1 thread): a step of the base-16 UNet at 28x28, batch 64, takes
        # 0.30 s at load 2.8 and 0.59 s at load 7; 40 Euler steps over 500 sources 90 s at load 7. 3500 steps
        # + transporting 2000 sources + the straightness: ~25 min quiet, ~42 min loaded.
        # paper: the authors' CIFAR-10 config (1.3M iterations, batch 128, lr 2e-4, warm-up 5000, EMA 0.9999)
        **training_options("flow", steps=Option(smoke=60, cpu=3500, fast=20_000, paper=1_300_000)),
        "reflow": Option(0, help="extra rectification rounds on generated pairs (0: the 1-rectified flow)"),
        "reflow_pairs": Option(smoke=256, cpu=2000, fast=None, paper=None, type=int,
                               help="source samples pushed through the flow per reflow round (null: all)"),
        "ode_method": Option("euler", choices=ode.METHODS,
                authors='rk45', source='gnobitab/RectifiedFlow ImageGeneration configs (CIFAR-10) (adaptive RK45, tol 1e-5)'),
        "ode_steps": Option(smoke=8, cpu=40, fast=100, paper=100,
                            help="ODE steps on images (NFE); the authors sample with adaptive RK45"),
        "toy_ode_steps": Option(100, help="ODE steps on vector tasks"),
        "straightness_n": Option(smoke=64, cpu=256, fast=1000, paper=1000,
                                 help="held source samples the straightness is measured on"),
    }
    compared_against = 'gnobitab/RectifiedFlow (ImageGeneration configs, sde_lib.py, losses.py); ICLR 2023 paper Sec. 5.3'
    deviations = (
        "velocity model: this benchmark's UNet trained from scratch for `flow_steps` (authors: NCSN++ nf 128, 1.3M iterations, Adam 2e-4, EMA 0.999999); t ~ U[0, 1] where the authors draw U[1e-3, 1]",
    )
    test_options: dict[str, Any] = {**tiny_options("flow"), "ode_steps": 3, "toy_ode_steps": 3,
                                    "straightness_n": 8, "reflow_pairs": 16}

    def __init__(self, budget: str = "smoke", **options: Any) -> None:
        super().__init__(budget, **options)
        if self.options["reflow"] < 0:
            raise BenchError("reflow option reflow must be >= 0 (0: the 1-rectified flow)")
        self.extra_state: dict[str, Any] = {}
        self.is_image = True

    # -- declared properties -------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return int(self.options["ode_steps"] if self.is_image else self.options["toy_ode_steps"])

    @property
    def nfe(self) -> int:
        return ode.evaluations(self.options["ode_method"], self.steps)

    def check_setting(self, data: TaskData) -> None:
        super().check_setting(data)
        check_same_shape(self, data, "interpolates source and target samples")

    # -- setup: the velocity field -------------------------------------------------------------
    def setup(self, data: TaskData, run) -> None:
        self.is_image = data.is_image
        self.shape = tuple(data.shape)
        self.velocity, self.work_shape = network(self.shape, self.options)
        self.ema = EMA(self.velocity, decay=self.options["flow_ema"])
        self.held = torch.zeros(0, dtype=torch.long)  # source rows the straightness is measured on
        self.pair_x0 = self.pair_x1 = torch.zeros(0)  # a reflow round's generated pairs (while it trains)

    def _flow(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return in_rows(self.ema, x, t)  # on the CPU, 128 rows a call

    def _push(self, x0: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Z1 = the end of the ODE from Z0 = x0 (canvas space), in batches."""
        return torch.cat([ode.integrate(self._flow, x0[i:i + batch], 0.0, 1.0, self.steps, self.options["ode_method"])
                          for i in range(0, len(x0), batch)])

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, data: TaskData, run) -> None:
        o, dev, img = self.options, run.device, self.is_image
        source = to_canvas(data.source_train.float(), self.work_shape).to(dev)
        target = to_canvas(data.target_train.float(), self.work_shape).to(dev)
        batch = setting(o, "flow", "batch", img)

        # 1. the 1-rectified flow on independent pairs
        def independent(net, g):
            i = torch.randint(0, len(source), (batch,), generator=g, device=dev)
            j = torch.randint(0, len(target), (batch,), generator=g, device=dev)
            return ode.flow_matching_loss(net, source[i], target[j], g)

        self._train_round(0, independent, run)
        self._measure_straightness(0, source, run)

        # 2. reflow: rounds on the flow's own (x0, Z1(x0)) pairs, fine-tuning the previous flow
        for r in range(1, int(o["reflow"]) + 1):
            if not run.done(f"reflow-pairs{r}"):
                with run.stage(f"reflow-pairs{r}"):
                    g = run.generator(f"reflow-pairs{r}")
                    n = len(source) if o["reflow_pairs"] is None else min(len(source), int(o["reflow_pairs"]))
                    self.pair_x0 = source[torch.randperm(len(source), generator=g, device=dev)[:n]].clone()
                    self.pair_x1 = self._push(self.pair_x0)
                run.mark_done(f"reflow-pairs{r}")
            x0, x1 = self.pair_x0, self.pair_x1

            def coupled(net, g, x0=x0, x1=x1):
                i = torch.randint(0, len(x0), (batch,), generator=g, device=dev)
                return ode.flow_matching_loss(net, x0[i], x1[i], g)

            self._train_round(r, coupled, run)
            self._measure_straightness(r, source, run)
        # the generated pairs are not needed any more (and would swell every later checkpoint)
        self.pair_x0 = self.pair_x1 = torch.zeros(0, device=dev)

    def _train_round(self, r: int, loss, run) -> None:
        o, img = self.options, self.is_image
        fit_network(self, run, self.velocity, self.ema, loss, loop=f"reflow-round{r}", stream=f"reflow-round{r}",
                    optimizer=f"flow{r}", steps=setting(o, "flow", "steps", img), lr=setting(o, "flow", "lr", img),
                    warmup=o["flow_warmup"], grad_clip=o["flow_grad_clip"])

    @torch.no_grad()
    def _measure_straightness(self, r: int, source: torch.Tensor, run) -> None:
        if run.done(f"reflow-straightness{r}"):
            return
        with run.stage(f"reflow-straightness{r}"):
            if len(self.held) == 0:  # drawn once: the same held samples after every round
                g = run.generator("reflow-straightness")
                self.held = torch.randperm(len(source), generator=g, device=source.device)[:self.options["straightness_n"]]
            s, _ = ode.straightness(self._flow, source[self.held], self.steps)
            self.extra_state.setdefault("straightness", {})[str(r)] = s
            run.log("reflow-straightness", r, straightness=s)
        run.mark_done(f"reflow-straightness{r}")

    # -- transport ----------------------------------------------------------------------------------
    @torch.no_grad()
    def transport(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z0 = to_canvas(x.to(self.device).float(), self.work_shape)
        z1 = ode.integrate(self._flow, z0, 0.0, 1.0, self.steps, self.options["ode_method"])
        return from_canvas(z1, self.shape).float()

    def bound_terms(self) -> dict[str, float] | None:
        s = self.extra_state.get("straightness")
        if not s:
            return None
        out = {f"straightness_round{r}": v for r, v in sorted(s.items(), key=lambda kv: int(kv[0]))}
        out["straightness"] = s[str(max(int(r) for r in s))]
        out["reflow_rounds"] = int(self.options["reflow"])
        return out
