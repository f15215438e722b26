"""Rectified flow (Liu, Gong & Liu, ICLR 2023) as a translator from the source to the target domain.

The algorithm, top to bottom:

1. **1-rectified flow.**  Draw x0 from the source and x1 from the target *independently* and fit a
   velocity field v(x, t) (a UNet on images, an MLP on vectors, EMA of the weights) by one of two losses
   (``loss``; its default: classifier on images, pixel on vectors), with x_t = t x1 + (1 - t) x0 and t ~ U[0, 1]:
   * ``pixel``: the rectified-flow (flow-matching) loss E || (x1 - x0) - v(x_t, t) ||^2
     (``bench.ode.flow_matching_loss``; the paper's Algorithm 1, its generation and toy experiments);
   * ``classifier`` (the default on images): the paper's image-to-image translation loss (Sec. 5.3),
         E || grad h(x_t)^T ((x1 - x0) - v(x_t, t)) ||^2,
     with h "the latent representation of a classifier trained to distinguish the images from the two
     domains" (``feature_loss``).  h(x_t) moves along the straight path as dh = grad h^T (x1 - x0) dt, so
     the loss asks the flow to move h as the straight path does and leaves the directions h does not
     see free: the classifier's Jacobian re-weights the error towards what tells the domains apart.
     Here h is the last feature map of ``bench.domain.DomainClassifier`` (the classifier EGSDE uses),
     trained from scratch on the task's training images, source vs target, noised on the VP-SDE
     (t ~ U[t_eps, 1]: the noise makes it smooth off the data, where the interpolants lie), read at
     t_eps; the paper fine-tunes an ImageNet classifier on clean images.  grad h^T w is a Jacobian-vector
     product (``torch.func.jvp``): one forward-mode pass of the classifier, then its backward; at 28 px,
     batch 64 and the `cpu` classifier width 16 a step costs 1.5x a pixel-loss step (``CLASSIFIER_OPTIONS``).
     The loss is multiplied by a constant c^2 fixed once the classifier is trained, c^2 = mean ||x1 - x0||^2
     / mean ||grad h^T (x1 - x0)||^2 per dimension on a probe batch of independent pairs
     (``bound_feature_scale``), so that it starts at the pixel loss's value and the learning rate, warm-up
     and clip keep their meaning; a constant does not move the minimiser.
2. **Reflow** (``reflow`` = k extra rounds, 0 by default: the 1-rectified flow).  Round r pushes
   ``reflow_pairs`` source training samples through the current flow, giving coupled pairs
   (x0, Z1(x0)), and fine-tunes v on them with the same loss (the authors continue from the
   previous flow's weights), the 1-rectified flow's loss included.  Each round makes the paths
   straighter, so fewer Euler steps suffice.
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
from bench.diffusion import EMA, VPSDE, in_rows
from bench.domain import DomainClassifier, classifier_options, fit_domain_classifier
from bench.options import Option
from bench.scoremodel import (check_same_shape, fit_network, from_canvas, network, network_options,
                              tiny_options, to_canvas, training_options)


LOSSES = ("pixel", "classifier")
SEC_5_3 = ("Liu, Gong, Liu, ICLR 2023, Sec. 5.3 (image-to-image translation): minimise "
           "E||grad h(X_t)^T (X_1 - X_0 - v(X_t, t))||^2, h a classifier's latent representation")


def feature_loss(net, h, x0: torch.Tensor, x1: torch.Tensor, generator=None, t: torch.Tensor | None = None,
                 scale: float = 1.0, reduce: bool = True) -> torch.Tensor:
    """scale^2 E_t || grad h(x_t)^T ((x1 - x0) - v(x_t, t)) ||^2, mean over h's output dimensions, t ~ U[0, 1]
    (Liu et al. 2023, Sec. 5.3).  ``h`` maps a batch of x-shaped rows to features (its parameters fixed);
    the Jacobian-vector product is taken by forward-mode AD, and the loss is differentiable in ``net``.
    With h the identity it is ``bench.ode.flow_matching_loss``."""
    if x0.shape != x1.shape:
        raise BenchError(f"flow matching needs pairs of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if t is None:
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    xt = ode.interpolate(x0, x1, t)
    w = (x1 - x0).float() - net(xt, t).float()
    _, jw = torch.func.jvp(h, (xt.float(),), (w,))
    per = jw.float().pow(2).flatten(1).mean(1) * float(scale) ** 2
    return per.mean() if reduce else per


# the domain classifier h of loss=classifier: EGSDE's recipe (bench.domain), narrower on `cpu`.  Measured on the
# 2-core machine (1 thread, load ~10, Intel Xeon), 28x28, batch 64: a pixel-loss step 0.86 s, a classifier-loss
# step 1.30 s with width 16 and 2.27 s with EGSDE's 32 (0.93 s pixel in that run); a classifier step (2 x 32
# images) 0.17 s at width 16.  Width 16 after 1000 steps tells 1000 held-out MNIST from 1000 held-out Chinese-MNIST
# training images apart at 100 % (t = t_eps, 0.2, 0.5; digits seed 0), so `cpu` takes 16.
CLASSIFIER_OPTIONS = classifier_options(cpu_width=16)  # width 16 on cpu: the feature loss's jvp costs 1.5x


class ReFlow(Method):
    name = "reflow"
    family = "Flow"
    settings = (UNPAIRED, SEMI_PAIRED)
    stochastic = False
    uses_pairs = False
    paper = ("Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified "
             "Flow. ICLR 2023")
    probe_loop = "reflow-round0"
    probe_every = {"cpu": 500}
    readme_label = "ReFlow (the paper's classifier-feature loss, 3,500 flow steps, 40 Euler steps)"
    readme_grids = "dimmed, thinned copies of the MNIST sources: the feature loss leaves the velocity free off the classifier's directions"
    readme_order = 8
    notes = ("1-rectified flow on independent (source, target) pairs, on images with the paper's translation loss "
             "(Sec. 5.3: the velocity error weighted through a source-vs-target classifier's features, trained here "
             "from scratch; loss=pixel: plain flow matching), translation by an Euler ODE from the "
             "source; reflow=k adds k rounds on generated pairs (fine-tuned from the previous flow) and "
             "reports each round's straightness. Guiding pairs unused. The authors' image-translation code "
             "is unreleased, so paper-budget counts are their CIFAR-10 generation config's; UNet/MLP velocity "
             "field with EMA")
    default_options: dict[str, Any] = {
        **network_options(),
        # cpu: 3500 steps keep fit + transport + straightness near the 45-minute cap on a 2-core CPU with the plain
        # loss; loss=classifier makes a step 1.5x as long and adds the classifier's steps (studies/cpu_perf)
        # paper: the authors' CIFAR-10 config (1.3M iterations, batch 128, lr 2e-4, warm-up 5000, EMA 0.9999)
        **training_options("flow", steps=Option(smoke=60, cpu=3500, fast=20_000, paper=1_300_000)),
        "reflow": Option(0, help="extra rectification rounds on generated pairs (0: the 1-rectified flow)"),
        "reflow_pairs": Option(smoke=256, cpu=2000, fast=None, paper=None, type=int,
                               help="source samples pushed through the flow per reflow round (null: all)"),
        "ode_method": Option("euler", choices=ode.METHODS,
                authors='rk45', source='gnobitab/RectifiedFlow ImageGeneration configs (CIFAR-10) (adaptive RK45, tol 1e-5)'),
        "ode_steps": Option(smoke=8, cpu=40, fast=100, paper=100, vector=100,
                            help="ODE steps (NFE); the authors sample with adaptive RK45"),
        "straightness_n": Option(smoke=64, cpu=256, fast=1000, paper=1000,
                                 help="held source samples the straightness is measured on"),
        # the training loss (module docstring, step 1)
        "loss": Option("classifier", choices=LOSSES, authors="classifier", source=SEC_5_3, help=(
            "classifier, the paper's translation loss ||grad h(x_t)^T (x1 - x0 - v)||^2 with h the domain "
            "classifier's last feature map (images); pixel, plain flow matching ||x1 - x0 - v||^2 (vectors)"),
            vector=Option("pixel", authors="pixel", source=(
                "Liu, Gong, Liu, ICLR 2023, Algorithm 1 and Sec. 5.1 (toy examples: the plain loss)"))),
        **CLASSIFIER_OPTIONS,
    }
    # rows stored before the loss option: plain flow matching, no classifier (its options then changed nothing)
    options_before = {"loss": "pixel", **CLASSIFIER_OPTIONS}
    compared_against = 'gnobitab/RectifiedFlow (ImageGeneration configs, sde_lib.py, losses.py); ICLR 2023 paper Sec. 5.3'
    deviations = (
        "velocity model: this benchmark's UNet trained from scratch for `flow_steps` (authors: NCSN++ nf 128, 1.3M iterations, Adam 2e-4, EMA 0.999999); t ~ U[0, 1] where the authors draw U[1e-3, 1]",
        "loss=classifier: h is the last feature map of a small time-conditional CNN trained from scratch on noisy source-vs-target training images, read at t_eps (the paper fine-tunes an ImageNet classifier on clean images; which layer is unstated), and the loss is scaled by a constant so that it starts at the pixel loss's value",
    )
    # the velocity field, its EMA, the domain classifier (None under the pixel loss), the held sources the
    # straightness is measured on (drawn once), and a reflow round's generated pairs (ODE pushes, cleared after
    # the last round)
    state_attrs = ("velocity", "ema", "classifier", "held", "pair_x0", "pair_x1")
    test_options: dict[str, Any] = {**tiny_options("flow"), "ode_steps": 3, "straightness_n": 8, "reflow_pairs": 16,
                                    "cls_steps": 4, "cls_batch": 8, "cls_width": 8}

    def __init__(self, budget: str = "smoke", **options: Any) -> None:
        super().__init__(budget, **options)
        if self.options["reflow"] < 0:
            raise BenchError("reflow option reflow must be >= 0 (0: the 1-rectified flow)")
        self.extra_state: dict[str, Any] = {}

    # -- declared properties -------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return int(self.options["ode_steps"])

    @property
    def nfe(self) -> int:
        return ode.evaluations(self.options["ode_method"], self.steps)

    def check_setting(self, data: TaskData) -> None:
        super().check_setting(data)
        check_same_shape(self, data, "interpolates source and target samples")

    # -- setup: the velocity field -------------------------------------------------------------
    def setup(self, data: TaskData, run) -> None:
        self.check_kind(data)
        self.shape = tuple(data.shape)
        self.velocity, self.work_shape = network(self.shape, self.options)
        self.ema = EMA(self.velocity, decay=self.options["flow_ema"])
        self.held = torch.zeros(0, dtype=torch.long)  # source rows the straightness is measured on
        # h of the paper's translation loss (loss=classifier): a domain classifier on the canvas
        self.uses_classifier = self.options["loss"] == "classifier"
        self.classifier = (DomainClassifier(self.work_shape, int(self.options["cls_width"]),
                                            int(self.options["mlp_hidden"]), int(self.options["mlp_depth"]))
                           if self.uses_classifier else None)
        self.cls_sde = VPSDE()  # the noise the classifier is trained under (t ~ U[t_eps, 1]); h reads t_eps
        self.pair_x0 = self.pair_x1 = torch.zeros(0)  # a reflow round's generated pairs (while it trains)

    def _flow(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return in_rows(self.ema, x, t)  # on the CPU, 128 rows a call

    def _push(self, x0: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Z1 = the end of the ODE from Z0 = x0 (canvas space), in batches."""
        return torch.cat([ode.integrate(self._flow, x0[i:i + batch], 0.0, 1.0, self.steps, self.options["ode_method"])
                          for i in range(0, len(x0), batch)])

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, data: TaskData, run) -> None:
        o, dev = self.options, run.device
        source = to_canvas(data.source_train.float(), self.work_shape).to(dev)
        target = to_canvas(data.target_train.float(), self.work_shape).to(dev)
        batch = o["flow_batch"]
        if self.uses_classifier:
            self._fit_classifier(source, target, run)
        pair_loss = self._pair_loss()

        # 1. the 1-rectified flow on independent pairs
        def independent(net, g):
            i = torch.randint(0, len(source), (batch,), generator=g, device=dev)
            j = torch.randint(0, len(target), (batch,), generator=g, device=dev)
            return pair_loss(net, source[i], target[j], g)

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
                return pair_loss(net, x0[i], x1[i], g)

            self._train_round(r, coupled, run)
            self._measure_straightness(r, source, run)
        # the generated pairs are not needed any more (and would swell every later checkpoint)
        self.pair_x0 = self.pair_x1 = torch.zeros(0, device=dev)

    # -- h: the domain classifier of the translation loss ----------------------------------------------
    def h(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's last feature map at t_eps: the feature map h(x) of the paper's Sec. 5.3."""
        return self.classifier.features(x, torch.full((x.shape[0],), self.cls_sde.t_eps, device=x.device))

    def _fit_classifier(self, source: torch.Tensor, target: torch.Tensor, run) -> None:
        o = self.options
        fit_domain_classifier(self, run, self.classifier, source, target, self.cls_sde,
                              batch=int(o["cls_batch"]), steps=int(o["cls_steps"]),
                              lr=float(o["cls_lr"]), weight_decay=float(o["cls_weight_decay"]),
                              loop="reflow-classifier", stream="reflow-classifier", optimizer="classifier")
        self.classifier.requires_grad_(False)  # fixed from here on: only the velocity field learns
        if not run.done("reflow-feature-scale"):
            with run.stage("reflow-feature-scale"), torch.no_grad():
                # c^2 = mean ||x1 - x0||^2 / mean ||grad h^T (x1 - x0)||^2 per dimension, independent pairs, t ~ U
                g = run.generator("reflow-feature-scale")
                n = min(256, len(source), len(target))
                i = torch.randint(0, len(source), (n,), generator=g, device=g.device).to(source.device)
                j = torch.randint(0, len(target), (n,), generator=g, device=g.device).to(source.device)
                t = torch.rand(n, generator=g, device=g.device).to(source.device)
                u = target[j] - source[i]
                ju = torch.cat([torch.func.jvp(self.h, (x,), (w,))[1]
                                for x, w in zip(ode.interpolate(source[i], target[j], t).split(64), u.split(64))])
                feat = float(ju.pow(2).flatten(1).mean(1).mean())
                self.extra_state["feature_scale"] = (float(u.pow(2).flatten(1).mean(1).mean()) / feat) ** 0.5 \
                    if feat > 0 else 1.0
            run.mark_done("reflow-feature-scale")

    def _pair_loss(self):
        """loss(net, x0, x1, g) of one minibatch of pairs: the translation loss or plain flow matching."""
        if not self.uses_classifier:
            return ode.flow_matching_loss
        scale = float(self.extra_state["feature_scale"])
        return lambda net, x0, x1, g: feature_loss(net, self.h, x0, x1, g, scale=scale)

    def _train_round(self, r: int, loss, run) -> None:
        o = self.options
        fit_network(self, run, self.velocity, self.ema, loss, loop=f"reflow-round{r}", stream=f"reflow-round{r}",
                    optimizer=f"flow{r}", steps=o["flow_steps"], lr=o["flow_lr"],
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

    def diagnostics(self) -> dict[str, float] | None:
        s = self.extra_state.get("straightness")
        if not s:
            return None
        out = {f"straightness_round{r}": v for r, v in sorted(s.items(), key=lambda kv: int(kv[0]))}
        out["straightness"] = s[str(max(int(r) for r in s))]
        out["reflow_rounds"] = int(self.options["reflow"])
        if "feature_scale" in self.extra_state:
            out["feature_scale"] = float(self.extra_state["feature_scale"])
        return out
