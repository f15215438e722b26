"""DPM-OT (Li, Li, Wang, Lei, Luo & Gu, ICCV 2023), adapted from generation to translation.

The paper.  Sampling a diffusion model is a chain of distribution maps; with few steps it mixes
modes.  DPM-OT replaces the first, long part of the reverse chain by one optimal-transport
"expressway": the training data are diffused to a high noise level t_M, giving a discrete set
of data latents {y_i}; a semi-discrete OT map (quadratic cost, Brenier potential
max_i <x, y_i> + h_i) is computed from white noise onto that set; a sample is white noise ->
OT map -> latent y_i -> M (about 10) reverse steps of the score model.  NFE = M.

The translator (this benchmark's honest adaptation).  The continuous source measure of the OT
map is the distribution of *diffused source images* instead of white noise:

1. train an unconditional noise-prediction model on the target training images
   (``bench.diffusion.dsm_loss`` with an EMA copy);
2. diffuse the target training images once to level t_M: the discrete latent set {y_i};
3. fit the semi-discrete OT map (``bench.semidiscrete``) from the law of
   alpha(t_M) x + sigma(t_M) z, x ~ source_train, z ~ N(0, I) (fresh noise every Monte-Carlo
   batch), onto {y_i} with uniform weights;
4. transport(x): diffuse x to t_M with fresh noise, map it to its target latent, then M reverse
   steps from t_M (ancestral by default; DDIM or Euler-Maruyama on option).

Guiding pairs are ignored (semi-paired tasks are accepted, the pairs are unused), and the
source image only acts through which target latent its diffused version is assigned to.
``generation_experiment`` reproduces the paper's own claim (few-step generation with less
mode mixture than a plain ancestral sampler) with the same score model.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from bench.api import SEMI_PAIRED, UNPAIRED, BenchError, Method, TaskData
from bench.budgets import Budget
from bench.diffusion import EMA, VPSDE, dsm_loss, sample_ddim, sample_sde
from bench.nn import ScoreMLP, UNet, crop_to, pad_to
from bench.semidiscrete import SemiDiscreteOT

SAMPLERS = ("ancestral", "ddim", "sde")


def _canvas(h: int, w: int) -> int:
    """Side of the square canvas the UNet works on: the next power of two (28 -> 32)."""
    return max(8, 1 << math.ceil(math.log2(max(h, w))))


def reverse_steps(net, x_t: torch.Tensor, sde: VPSDE, t_start: float, steps: int, sampler: str,
                  generator=None) -> torch.Tensor:
    """``steps`` reverse steps (NFE = steps) from ``x_t`` at level ``t_start`` down to t_eps."""
    if sampler == "ancestral":
        return sample_ddim(net, x_t.shape, sde, steps, generator=generator, x_T=x_t, t_start=t_start, eta=1.0)
    if sampler == "ddim":
        return sample_ddim(net, x_t.shape, sde, steps, generator=generator, x_T=x_t, t_start=t_start, eta=0.0)
    if sampler == "sde":
        return sample_sde(net, x_t.shape, sde, steps, generator=generator, x_T=x_t, t_start=t_start)
    raise BenchError(f"dpmot sampler must be one of {SAMPLERS}, got {sampler!r}")


class DPMOT(Method):
    name = "dpmot"
    family = "Diffusion+OT"
    settings = (UNPAIRED, SEMI_PAIRED)
    stochastic = True
    uses_pairs = False
    paper = ("Li et al., DPM-OT: a new diffusion probabilistic model based on optimal transport, "
             "ICCV 2023")
    notes = ("Translator adaptation: unconditional target score model; semi-discrete OT (Brenier "
             "potential, Adam dual ascent) from diffused SOURCE images at level t_M onto the target "
             "training set diffused to t_M; transport = diffuse to t_M, OT-map to a target latent, M "
             "reverse steps (NFE = M). Guiding pairs are accepted but unused. "
             "methods/dpmot.py:generation_experiment runs the paper's own few-step generation claim.")
    default_options: dict[str, Any] = {
        # score model (target domain, unconditional)
        "score_steps": None,   # budget: smoke 100, fast 8000
        "batch_size": None,    # budget: smoke 32, fast 128
        "lr": 2e-4,
        "warmup": 200,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "weighting": "sigma2",  # eps-MSE, as in DDPM; "g2" for likelihood weighting
        "base": None,          # UNet width; budget: smoke 16, fast 64
        "num_res_blocks": None,  # budget: smoke 1, fast 2
        "attention": None,     # self-attention at half resolution; budget: smoke off (CPU cost), fast on
        "hidden": 256,         # ScoreMLP width (vector tasks)
        "beta_min": 0.1,
        "beta_max": 20.0,
        # the OT expressway
        "t_M": 0.5,            # latent level of the OT map (alpha(0.5) = 0.28)
        "M": 10,               # reverse steps after the map (NFE)
        "sampler": "ancestral",  # "ancestral" | "ddim" | "sde"
        "ot_steps": None,      # budget: smoke 100, fast 3000
        "ot_batch": None,      # Monte-Carlo points per dual step; budget: smoke 512, fast 8192
        "ot_lr": 0.1,          # relative to the median top-2 score gap (bench.semidiscrete)
        "max_latents": None,   # size of the target latent set; budget: smoke 1000, fast all
    }
    test_options = {"score_steps": 20, "batch_size": 32, "base": 8, "num_res_blocks": 1, "hidden": 32,
                    "warmup": 5, "ot_steps": 30, "ot_batch": 128, "M": 3, "max_latents": 64}

    # -- setup ------------------------------------------------------------------------------
    def _opt(self, key: str, run, smoke, fast, paper=None):
        v = self.options[key]
        return run.budget.pick(smoke=smoke, fast=fast, paper=paper) if v is None else v

    def check_setting(self, data: TaskData) -> None:
        super().check_setting(data)
        if data.source_shape != data.shape:
            raise BenchError(f"dpmot needs source and target of one shape (inner products of latents); "
                             f"got {data.source_shape} vs {data.shape}: resize the task's sources")
        if self.options["sampler"] not in SAMPLERS:
            raise BenchError(f"dpmot sampler must be one of {SAMPLERS}")
        if not 0.0 < float(self.options["t_M"]) <= 1.0 or int(self.options["M"]) < 1:
            raise BenchError("dpmot needs 0 < t_M <= 1 and M >= 1")

    def setup(self, data: TaskData, run) -> None:
        o = self.options
        self.sde = VPSDE(o["beta_min"], o["beta_max"])
        self.is_image = data.is_image
        self.data_shape = data.shape
        if data.is_image:
            c, h, w = data.shape
            side = _canvas(h, w)
            self.work_shape = (c, side, side)
            mults = (1, 2, 2) if side >= 16 else (1, 2)
            self.net = UNet(c, c, base=self._opt("base", run, 16, 64), mults=mults,
                            num_res_blocks=self._opt("num_res_blocks", run, 1, 2),
                            attention_resolutions=(side // 2,) if self._opt("attention", run, False, True) else (),
                            image_size=side)
        else:
            self.work_shape = tuple(data.shape)
            self.net = ScoreMLP(int(data.shape[0]), hidden=o["hidden"], depth=3)
        self.ema = EMA(self.net, o["ema_decay"])
        self.opt = torch.optim.Adam(self.net.parameters(), lr=o["lr"])
        n_lat = len(data.target_train)
        cap = self._opt("max_latents", run, 1000, None)
        if cap is not None:
            n_lat = min(n_lat, int(cap))
        self.ot = SemiDiscreteOT(torch.zeros(n_lat, *self.work_shape))
        self.extra_state = {"n_latents": n_lat}

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return pad_to(x, self.work_shape[-1]) if self.is_image and x.shape[-1] != self.work_shape[-1] else x

    def _unprep(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_image:
            return x
        return crop_to(x, *self.data_shape[-2:]).clamp(-1, 1)

    @property
    def nfe(self) -> int:
        return int(self.options["M"])

    @property
    def t_M(self) -> float:
        return float(self.options["t_M"])

    # -- state: the optimiser travels with the checkpoint ----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["__optim__"] = self.opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        optim = state.pop("__optim__", None)
        super().load_state_dict(state)
        if optim is not None:
            self.opt.load_state_dict(optim)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, data: TaskData, run) -> None:
        o, dev, sde = self.options, run.device, self.sde
        target = self._prep(data.target_train).to(dev)
        source = self._prep(data.source_train).to(dev)
        if self.is_image and dev.type == "cuda":  # NHWC convolutions on the GPU
            self.net.to(memory_format=torch.channels_last)
            self.ema.module.to(memory_format=torch.channels_last)
            target = target.contiguous(memory_format=torch.channels_last)

        # 1. unconditional score model of the target domain
        steps = self._opt("score_steps", run, 100, 8000)
        bs = self._opt("batch_size", run, 32, 128)
        g = run.generator(1)
        net = run.maybe_compile(self.net)
        warm = max(1, int(o["warmup"]))
        self.net.train()
        for step in run.loop("score", steps):
            for group in self.opt.param_groups:
                group["lr"] = o["lr"] * min(1.0, (step + 1) / warm)
            x0 = target[torch.randint(0, len(target), (bs,), generator=g, device=dev)]
            with run.autocast():
                loss = dsm_loss(net, x0, sde, weighting=o["weighting"], generator=g)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if o["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), o["grad_clip"])
            self.opt.step()
            self.ema.update(self.net)
            if run.should_log(step):
                run.log("score", step, loss=loss)
        self.net.eval()

        # 2. the discrete latent set: target training images diffused once to t_M
        if not run.done("latents"):
            with run.stage("latents"):
                gl = run.generator(2)
                n_lat = self.extra_state["n_latents"]
                idx = torch.randperm(len(target), generator=gl, device=dev)[:n_lat].sort().values
                y0 = target[idx]
                z = torch.randn(y0.shape, generator=gl, device=dev)
                self.ot.set_targets(sde.perturb(y0, torch.full((n_lat,), self.t_M, device=dev), z))
            run.mark_done("latents")

        # 3. semi-discrete OT from diffused sources (fresh noise per batch) onto the latents
        def diffused_sources(n: int, gen):
            x = source[torch.randint(0, len(source), (n,), generator=gen, device=dev)]
            z = torch.randn(x.shape, generator=gen, device=dev)
            return sde.perturb(x, torch.full((n,), self.t_M, device=dev), z)

        ot_steps = self._opt("ot_steps", run, 100, 3000)
        ot_batch = self._opt("ot_batch", run, 512, 8192)
        go = run.generator(3)
        for step in run.loop("ot", ot_steps):
            gnorm = self.ot.step(diffused_sources, ot_batch, o["ot_lr"], generator=go)
            if (step + 1) % 25 == 0:
                self.ot.refine()
            if run.should_log(step, every=50):
                run.log("ot", step, grad_norm=gnorm)
        self.ot.use_best()

    # -- transport ------------------------------------------------------------------------------
    @torch.no_grad()
    def transport(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self._prep(x.float())
        n = len(x)
        z = torch.randn(x.shape, generator=generator, device=x.device)
        x_t = self.sde.perturb(x, torch.full((n,), self.t_M, device=x.device), z)
        y_t = self.ot.map(x_t)  # the OT expressway: source latent -> target latent
        out = reverse_steps(self.ema, y_t, self.sde, self.t_M, self.nfe, self.options["sampler"], generator)
        return self._unprep(out)


# -- the paper's own claim: few-step generation with less mode mixture ----------------------------
def generation_experiment(method: DPMOT, data: TaskData, task, ctx, nfes=(5, 10, 20),
                          baseline_steps=(100, 1000), n: int = 1000, batch: int = 500,
                          ot_steps: int | None = None, ot_batch: int | None = None,
                          ot_lr: float | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Unconditional generation with the fitted DPM-OT score model, two ways, same network.

    * DPM-OT: z ~ N(0, I) -> semi-discrete OT map (fitted here, Gaussian prior onto the method's
      latent set at t_M) -> ``k`` reverse steps from t_M, for each k in ``nfes``;
    * baseline: the plain ancestral (DDPM) sampler from pure noise at t = T with ``baseline_steps``.

    Each row: sampler, nfe, the task's FID columns (``task.fid(outputs, ctx)``), and the
    "mode mixture" share: fraction of samples whose task-classifier max softmax probability is
    below 0.5 (``task.classifier(ctx)`` returns logits).
    """
    with torch.enable_grad():  # a task may train (and cache) its classifier on first use
        classifier = task.classifier(ctx)
    with torch.no_grad():
        return _generation_rows(method, task, ctx, classifier, nfes, baseline_steps, n, batch,
                                ot_steps, ot_batch, ot_lr, seed)


def _generation_rows(method, task, ctx, classifier, nfes, baseline_steps, n, batch, ot_steps, ot_batch,
                     ot_lr, seed):
    dev = method.device
    budget = ctx.budget if isinstance(ctx.budget, Budget) else Budget(str(ctx.budget or "fast"))
    ot_steps = ot_steps or method.options["ot_steps"] or budget.pick(smoke=100, fast=3000)
    ot_batch = ot_batch or method.options["ot_batch"] or budget.pick(smoke=512, fast=8192)
    ot_lr = ot_lr or method.options["ot_lr"]
    shape = method.work_shape

    g = torch.Generator(device=dev).manual_seed(seed)
    prior_ot = SemiDiscreteOT(method.ot.targets.reshape(-1, *shape).clone()).to(dev)
    prior_ot.fit(lambda k, gen: torch.randn((k, *shape), generator=gen, device=dev),
                 steps=int(ot_steps), batch=int(ot_batch), lr=float(ot_lr), generator=g)
    masses = prior_ot.cell_masses(torch.randn((max(4096, 4 * len(prior_ot.targets)), *shape),
                                              generator=g, device=dev))
    ot_err = float((masses - prior_ot.weights).abs().max())

    def generate(make) -> torch.Tensor:
        outs = []
        for s in range(0, n, batch):
            outs.append(method._unprep(make(min(batch, n - s))).float().cpu())
        return torch.cat(outs)

    def score(outputs: torch.Tensor) -> dict[str, Any]:
        probs = []
        for s in range(0, len(outputs), batch):
            logits = classifier(outputs[s:s + batch].to(ctx.device))
            probs.append(torch.softmax(logits.float(), dim=1).max(1).values.cpu())
        conf = torch.cat(probs)
        row = {"mode_mixture": float((conf < 0.5).double().mean()),
               "mean_max_prob": float(conf.double().mean())}
        row.update(task.fid(outputs, ctx))
        return row

    rows: list[dict[str, Any]] = []
    common = {"n": n, "t_M": method.t_M, "seed": seed, "latents": len(prior_ot.targets)}
    for k in nfes:
        def dpm_ot(m, k=k):
            z = torch.randn((m, *shape), generator=g, device=dev)
            return reverse_steps(method.ema, prior_ot.map(z), method.sde, method.t_M, int(k),
                                 method.options["sampler"], g)
        rows.append({"sampler": f"dpm-ot ({method.options['sampler']})", "nfe": int(k),
                     "ot_mass_err": ot_err, **common, **score(generate(dpm_ot))})
    for k in baseline_steps:
        def ancestral(m, k=k):
            return sample_ddim(method.ema, (m, *shape), method.sde, int(k), generator=g, eta=1.0)
        rows.append({"sampler": "ancestral", "nfe": int(k), **common, **score(generate(ancestral))})
    return rows
