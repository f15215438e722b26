"""EGSDE: Energy-Guided Stochastic Differential Equations (Zhao, Bao, Li & Zhu, NeurIPS 2022).

The algorithm, top to bottom:

1. **Target diffusion model**: an unconditional noise-prediction model of the target domain
   (``bench.scoremodel.ScoreModel``; the authors take a pretrained one).
2. **Domain-specific feature extractor**: a time-dependent classifier trained to tell *noisy*
   source images (label 0) from noisy target images (label 1), x_t = alpha(t) x + sigma(t) z with
   t ~ U[t_eps, T] (the authors' noised classifier: AdamW, weight decay 0.05, learning rate decayed
   linearly to 0).  Its last feature map (before pooling) carries what is specific to a domain.
3. **Energy**  E(y, x, t) = lambda_s E_s(y, x_t, t) + lambda_i E_i(y, x_t) with x_t the source
   perturbed to time t with the same noise as the start point:
   * realism E_s = cosine similarity of the extractor's features of y and of x_t (per spatial
     position over channels, averaged; the authors' default), or -||f(y) - f(x_t)||^2: lowering it
     moves y away from the source domain's specific features;
   * faithfulness E_i = || LowPass(y) - LowPass(x_t) ||^2 summed over pixels, LowPass = average-pool
     down to ``lowpass_side`` pixels then bilinear back up (the authors' resize down/up by 32 at
     256 px, i.e. 8 px): keeps the domain-independent, low-frequency content of the source.
4. **Sampling**: perturb the source to the intermediate time t0 (``t0``, the authors' M = 0.5 T),
   y_{t0} = alpha(t0) x + sigma(t0) e, then run the reverse VP-SDE of the target model from t0 to
   t_eps with the score replaced by score - grad_y E (Euler-Maruyama, ``bench.diffusion.sample_sde``;
   the authors' discrete weight beta_t / sqrt(alpha_t) is this drift's discretisation), last step the
   denoised prediction.  NFE = ``sde_steps`` score-network calls (plus a classifier forward and
   backward per step).

On vector tasks the low-pass filter is the identity (there is nothing to resize) and the feature
extractor is an MLP.  Guiding pairs are unused.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import SEMI_PAIRED, UNPAIRED, BenchError, Method, TaskData
from bench.diffusion import grad_in_rows, sample_sde
from bench.nn import MLP, timestep_embedding
from bench.nn.unet import Downsample, ResBlock, _norm
from bench.options import Option
from bench.scoremodel import (ScoreModel, check_same_shape, diffusion_options, fit_network, network_options,
                              tiny_options, score_lr, training_options)

REALISM = ("cosine", "neg_l2")


class DomainClassifier(nn.Module):
    """p(domain | x_t, t): a time-conditional CNN (images) or MLP (vectors) with 2 logits.

    ``features(x, t)`` is the last feature map before pooling (N, C, h, w) on images, the last
    hidden layer (N, H) on vectors: EGSDE's domain-specific feature extractor."""

    def __init__(self, shape: tuple[int, ...], width: int, hidden: int, depth: int, levels: int = 2):
        super().__init__()
        self.image = len(shape) == 3
        if self.image:
            emb = 4 * width
            self.time_dim = width
            self.time_mlp = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
            self.conv_in = nn.Conv2d(shape[0], width, 3, padding=1)
            blocks: list[nn.Module] = []
            ch = width
            for level in range(levels):
                blocks += [ResBlock(ch, width * 2 ** level, emb, 0.0), Downsample(width * 2 ** level)]
                ch = width * 2 ** level
            blocks.append(ResBlock(ch, ch, emb, 0.0))
            self.blocks = nn.ModuleList(blocks)
            self.norm = _norm(ch)
            self.head = nn.Linear(ch, 2)
        else:
            self.time_dim = 32
            self.trunk = MLP(shape[0] + self.time_dim, hidden, hidden=hidden, depth=max(depth - 1, 1))
            self.head = nn.Linear(hidden, 2)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.time_dim).to(x.dtype)
        if not self.image:
            return F.silu(self.trunk(torch.cat([x, temb], 1)))
        emb = self.time_mlp(temb)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = self.features(x, t)
        if self.image:
            f = F.silu(self.norm(f)).mean((2, 3))
        return self.head(f)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: cosine over channels at every position, averaged over positions (vectors: one cosine)."""
    a, b = a.flatten(2) if a.dim() > 2 else a[..., None], b.flatten(2) if b.dim() > 2 else b[..., None]
    return (F.normalize(a, dim=1, eps=1e-10) * F.normalize(b, dim=1, eps=1e-10)).sum(1).mean(1)


def low_pass(x: torch.Tensor, side: int) -> torch.Tensor:
    """Average-pool images down to side x side, bilinear back up; vectors unchanged."""
    if x.dim() != 4:
        return x
    return F.interpolate(F.adaptive_avg_pool2d(x, side), size=x.shape[-2:], mode="bilinear", align_corners=False)


class EGSDE(Method):
    name = "egsde"
    family = "Diffusion"
    settings = (UNPAIRED, SEMI_PAIRED)
    stochastic = True
    uses_pairs = False
    paper = ("Zhao, Bao, Li, Zhu. EGSDE: Unpaired Image-to-Image Translation via Energy-Guided Stochastic "
             "Differential Equations. NeurIPS 2022")
    probe_loop = "target-score"
    notes = ("target VP-SDE score model trained here (the authors use a pretrained one); time-dependent source-vs-"
             "target classifier trained here on noisy images; source perturbed to t0, reverse SDE with score - "
             "grad E, E = lambda_s cos(features(y), features(x_t)) + lambda_i ||LowPass(y) - LowPass(x_t)||^2 "
             "(average-pool to 8 px and back; identity on vectors). NFE counts score-network calls; each step "
             "also runs the classifier. Guiding pairs unused")
    default_options: dict[str, Any] = {
        **network_options(),
        **diffusion_options(),
        # cpu, measured on this 2-core machine (1 thread, load 7): 0.51 s per step of the base-16 UNet at 28x28,
        # batch 64 (0.30 s at load 2.8), 0.27 s per classifier step, 40 guided steps over 500 sources 213 s.
        # 3000 + 1000 steps and 30 guided steps over 2000 sources: ~25 min quiet, ~40 min loaded.
        # paper: the authors use a pretrained model (ILVR's afhq_dog_4m); 300k here is this project's choice
        **training_options("score", steps=Option(smoke=60, cpu=3000, fast=10_000, paper=300_000),
                            lr=score_lr()),
        # the domain classifier (authors: 5000 iterations, batch 32, AdamW lr 3e-4, weight decay 0.05,
        # linear decay; width 128 at 256 px)
        "cls_steps": Option(smoke=60, cpu=1000, fast=5000, paper=5000,
                authors=5000, source='ML-GSAI/EGSDE classifier fine-tuning (5k steps)'),
        "toy_cls_steps": Option(smoke=1000, cpu=2000, fast=2000, paper=2000),
        "cls_batch": Option(smoke=16, cpu=32, fast=32, paper=32, help="noisy images per domain per step"),
        "toy_cls_batch": Option(256, help="noisy samples per domain per step on vector tasks"),
        "cls_lr": Option(3e-4),
        "cls_weight_decay": Option(0.05),
        "cls_width": Option(smoke=16, cpu=32, fast=64, paper=128, help="classifier width on images"),
        # sampling (authors, cat->dog: t = 500 of 1000, ls 500, li 2, cosine / neg_l2, down_N 32 at 256 px)
        "t0": Option(0.5, help="the intermediate time M the source is perturbed to (in (0, T])",
                authors=0.5, source='ML-GSAI/EGSDE profiles/cat2dog, runners/egsde.py (t = 500 of 1000)'),
        "lambda_s": Option(500.0, help="weight of the realism energy"),
        "lambda_i": Option(2.0, help="weight of the faithfulness energy"),
        "realism": Option("cosine", choices=REALISM),
        "lowpass_side": Option(8, help="the low-pass image's side in pixels (authors: 256 / 32 = 8)"),
        "sde_steps": Option(smoke=10, cpu=30, fast=500, paper=500, help="reverse-SDE steps from t0 (NFE)",
                authors=500, source='ML-GSAI/EGSDE profiles/cat2dog, runners/egsde.py (500 ancestral steps)'),
        "toy_sde_steps": Option(200),
    }
    compared_against = 'ML-GSAI/EGSDE (functions/denoising.py, runners/egsde.py, profiles/cat2dog)'
    deviations = (
        'score model trained from scratch on the target domain (the authors use a pretrained ADM); domain classifier a width-32 CNN trained from scratch on noisy images of both domains (the authors fine-tune an ImageNet ADM classifier)',
        "Euler-Maruyama on the continuous VP-SDE from t0 with beta(t)dt as the energy weight, the continuous form of the authors' beta_t / sqrt(alpha_t), plus a final denoising step",
    )
    test_options: dict[str, Any] = {**tiny_options("score"), "cls_steps": 4, "toy_cls_steps": 4, "cls_batch": 8,
                                    "toy_cls_batch": 8, "cls_width": 8, "sde_steps": 3, "toy_sde_steps": 3}

    def __init__(self, budget: str = "smoke", **options: Any) -> None:
        super().__init__(budget, **options)
        if not 0.0 < float(self.options["t0"]) <= 1.0:
            raise BenchError(f"egsde option t0 must lie in (0, 1], got {self.options['t0']}")
        self.is_image = True

    @property
    def nfe(self) -> int:
        return int(self.options["sde_steps"] if self.is_image else self.options["toy_sde_steps"])

    def check_setting(self, data: TaskData) -> None:
        super().check_setting(data)
        check_same_shape(self, data, "compares each sample with its perturbed source")

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, data: TaskData, run) -> None:
        o = self.options
        self.is_image = data.is_image
        self.target_model = ScoreModel(data.shape, o)
        self.classifier = DomainClassifier(self.target_model.work_shape, int(o["cls_width"]),
                                           int(o["mlp_hidden"]), int(o["mlp_depth"]))

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, data: TaskData, run) -> None:
        o, dev, model = self.options, run.device, self.target_model
        # 1. the target diffusion model
        model.fit(self, run, data.target_train, o, "target-score")
        # 2. the domain classifier on noisy source (0) and target (1) samples
        xs, yt = model.prep(data.source_train).to(dev), model.prep(data.target_train).to(dev)
        b = int(o["cls_batch"] if self.is_image else o["toy_cls_batch"])
        labels = torch.cat([torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long)]).to(dev)
        sde = model.sde

        def domain_loss(net, g):
            x0 = torch.cat([xs[torch.randint(0, len(xs), (b,), generator=g, device=dev)],
                            yt[torch.randint(0, len(yt), (b,), generator=g, device=dev)]])
            t = sde.t_eps + (sde.T - sde.t_eps) * torch.rand(2 * b, generator=g, device=dev)
            x_t = sde.perturb(x0, t, torch.randn(x0.shape, generator=g, device=dev))
            return F.cross_entropy(net(x_t, t), labels)

        fit_network(self, run, self.classifier, None, domain_loss, loop="domain-classifier",
                    stream="egsde-classifier", optimizer="classifier",
                    steps=int(o["cls_steps"] if self.is_image else o["toy_cls_steps"]), lr=float(o["cls_lr"]),
                    weight_decay=float(o["cls_weight_decay"]), anneal=True)

    # -- the energy and the guided sampler --------------------------------------------------------------
    def energy(self, y: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E(y, x_t, t) per sample: lambda_s E_s + lambda_i E_i."""
        o = self.options
        fy, fx = self.classifier.features(y, t), self.classifier.features(x_t, t)
        if o["realism"] == "cosine":
            e_s = cosine_similarity(fy, fx)
        else:
            e_s = -(fy - fx).pow(2).flatten(1).sum(1)
        side = int(o["lowpass_side"])
        e_i = (low_pass(y, side) - low_pass(x_t, side)).pow(2).flatten(1).sum(1)
        return float(o["lambda_s"]) * e_s + float(o["lambda_i"]) * e_i

    @torch.no_grad()
    def transport(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        model, sde = self.target_model, self.target_model.sde
        x0 = model.prep(x.to(self.device).float())
        n = len(x0)
        e = torch.randn(x0.shape, generator=generator, device=x0.device)  # one noise for y_t0 and every x_t
        t0 = float(self.options["t0"])
        y = sde.perturb(x0, torch.full((n,), t0, device=x0.device), e)

        def guided_eps(y_t, t):
            # score - grad E  <=>  eps + sigma(t) grad E  (score = -eps / sigma)
            eps = model(y_t, t).float()
            grad = grad_in_rows(self.energy, y_t, sde.perturb(x0, t, e), t)  # t: one time per row
            shape = (-1,) + (1,) * (y_t.dim() - 1)
            return eps + sde.sigma(t).reshape(shape) * grad

        out = sample_sde(guided_eps, x0.shape, sde, self.nfe, generator=generator, x_T=y, t_start=t0,
                         denoise=True)
        return model.unprep(out).float()
