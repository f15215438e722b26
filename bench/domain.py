"""A time-conditional domain classifier p(domain | x_t, t) and its trainer, shared by EGSDE and ReFlow.

``DomainClassifier`` tells noisy source samples (label 0) from noisy target samples (label 1); its
``features(x, t)`` (the last feature map before pooling on images, the last hidden layer on vectors)
is the domain-specific representation both methods read:

* EGSDE's realism energy compares the features of the sample and of the perturbed source
  (Zhao et al. 2022, the authors fine-tune an ImageNet ADM classifier on noisy cat / dog images);
* ReFlow's translation loss weights the velocity error through the features' Jacobian
  (Liu et al. 2023, Sec. 5.3, "the latent representation of a classifier trained to distinguish the
  images from the two domains").

Here the classifier is trained from scratch on the task's training images only (no labels other than
which domain an image comes from): x_t = alpha(t) x + sigma(t) z on the VP-SDE with t ~ U[t_eps, T],
AdamW with weight decay, the learning rate decayed linearly to 0 (the EGSDE authors' recipe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import VPSDE
from .options import Option
from .nn import MLP, timestep_embedding
from .nn.unet import Downsample, ResBlock, _norm
from .scoremodel import fit_network


class DomainClassifier(nn.Module):
    """p(domain | x_t, t): a time-conditional CNN (images) or MLP (vectors) with 2 logits.

    ``features(x, t)`` is the last feature map before pooling (N, C, h, w) on images, the last
    hidden layer (N, H) on vectors: the domain-specific feature extractor."""

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


def classifier_options(cpu_width: int, **steps_meta) -> dict[str, Option]:
    """The domain classifier's options, one declaration for every method that trains one (``steps_meta``: e.g. the
    authors' value and source of ``cls_steps``)."""
    return {
        "cls_steps": Option(smoke=60, cpu=1000, fast=5000, paper=5000, help="classifier steps",
                            vector=Option(smoke=1000, cpu=2000, fast=2000, paper=2000), **steps_meta),
        "cls_batch": Option(smoke=16, cpu=32, fast=32, paper=32, vector=256,
                            help="noisy samples per domain per step"),
        "cls_lr": Option(3e-4),
        "cls_weight_decay": Option(0.05),
        "cls_width": Option(smoke=16, cpu=cpu_width, fast=64, paper=128, help="classifier width on images"),
    }


def fit_domain_classifier(method, run, classifier: DomainClassifier, source: torch.Tensor, target: torch.Tensor,
                          sde: VPSDE, *, batch: int, steps: int, lr: float, weight_decay: float, loop: str,
                          stream: str, optimizer: str) -> None:
    """Cross-entropy on ``batch`` noisy source (0) and ``batch`` noisy target (1) samples a step, t ~ U[t_eps, T]
    of ``sde``; AdamW (``weight_decay``), lr decayed linearly to 0, in the resumable loop ``loop``.  ``source``
    and ``target`` are on the run's device, in the classifier's (canvas) space."""
    dev = source.device
    labels = torch.cat([torch.zeros(batch, dtype=torch.long), torch.ones(batch, dtype=torch.long)]).to(dev)

    def domain_loss(net, g):
        x0 = torch.cat([source[torch.randint(0, len(source), (batch,), generator=g, device=dev)],
                        target[torch.randint(0, len(target), (batch,), generator=g, device=dev)]])
        t = sde.t_eps + (sde.T - sde.t_eps) * torch.rand(2 * batch, generator=g, device=dev)
        x_t = sde.perturb(x0, t, torch.randn(x0.shape, generator=g, device=dev))
        return F.cross_entropy(net(x_t, t), labels)

    fit_network(method, run, classifier, None, domain_loss, loop=loop, stream=stream, optimizer=optimizer,
                steps=steps, lr=lr, weight_decay=weight_decay, anneal=True)
