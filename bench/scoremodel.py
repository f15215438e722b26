"""An unconditional noise-prediction (score) model of one domain, and the trainer it shares with
every method that fits a network to a minibatch loss with EMA.

``ScoreModel(shape, options)`` holds an eps-prediction network (``bench.nn.UNet`` on images padded
to the smallest canvas its levels divide, ``bench.nn.ScoreMLP`` on vectors), its EMA copy and the
VP-SDE (``bench.diffusion``).  ``fit`` trains it by denoising score matching on a set of samples
through ``run.loop`` (resumable: the optimizer goes through ``Method.optimizer``, the minibatches
and noise come from a named ``run.generator`` stream); calling it returns the EMA network's
prediction, the model samplers use.  EGSDE and SCONES fit one on the target domain, DDIB one per
domain, DPM-OT's step 1 trains its network with ``fit_network``.

``network_options()`` / ``training_options(prefix, ...)`` declare the options once (typed, one
value per budget) so that every method using a model here spells them the same way; ``fit_network``
is the loop itself (Adam, linear warm-up, gradient clipping, EMA, logging), for any loss.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import BenchError
from .diffusion import EMA, VPSDE, dsm_loss, in_rows
from .nn import ScoreMLP, UNet, canvas_side, crop_to, pad_to
from .options import Option

WEIGHTINGS = ("sigma2", "g2")


# -- declared options ---------------------------------------------------------------------------
def network_options(base: Option | None = None, blocks: Option | None = None,
                    attention: Option | None = None) -> dict[str, Option]:
    """Architecture of the time-conditional networks (UNet on images, MLP on vectors)."""
    return {
        "unet_base": base or Option(smoke=16, cpu=16, fast=64, paper=64, help="UNet width"),
        "unet_mults": Option([1, 2, 2], help="UNet channel multipliers per level"),
        "unet_blocks": blocks or Option(smoke=1, cpu=1, fast=2, paper=2, help="residual blocks per level"),
        "unet_attention": attention or Option(smoke=[], cpu=[], fast=[1], paper=[1], type=list,
                                              help="UNet levels with self-attention (0 = full resolution)"),
        "mlp_hidden": Option(256, help="MLP width on vector tasks"),
        "mlp_depth": Option(3, help="MLP hidden layers on vector tasks"),
    }


# The `cpu` learning rate of the unconditional VP-SDE score models (base-16 UNet, batch 64, warm-up 200, clip 1,
# EMA 0.999): the lr with the lowest held-out eps-MSE after 2,000 steps among 2e-4, 1e-3 and 2e-3, measured on
# Chinese-MNIST training writers of suites 71-80 (studies/score_lr: 0.0075 / 0.0060 / 0.0058). fast / paper keep
# 2e-4 (the authors' DDPM/ADM-style rate).
CPU_SCORE_LR = 2e-3


def score_lr() -> Option:
    """The Adam lr of a VP-SDE score model: 2e-4, and on `cpu` the measured CPU_SCORE_LR (held-out eps-MSE:
    studies/score_lr, for the unconditional models and OTCS's conditional one)."""
    return Option(2e-4, cpu=CPU_SCORE_LR, help="Adam lr of the score model (cpu: measured, bench.scoremodel)")


def training_options(prefix: str, steps: Option, vector_steps: Option | None = None, batch: Option | None = None,
                     lr: float | Option = 2e-4, warmup: int = 200, ema: float = 0.999) -> dict[str, Option]:
    """Training of one network: ``{prefix}_steps``, ``_batch``, ``_lr`` (each with its value on vector tasks),
    ``_warmup``, ``_grad_clip``, ``_ema``."""
    lr = lr if isinstance(lr, Option) else Option(lr)
    return {
        f"{prefix}_steps": steps.on_vectors(vector_steps or Option(smoke=2000, cpu=4000, fast=10_000, paper=10_000)),
        f"{prefix}_batch": (batch or Option(smoke=16, cpu=64, fast=128, paper=128)).on_vectors(256),
        f"{prefix}_lr": lr.on_vectors(1e-3),
        f"{prefix}_warmup": Option(warmup, help="linear learning-rate warm-up steps"),
        f"{prefix}_grad_clip": Option(1.0, type=float, help="gradient-norm clip (0: none)"),
        f"{prefix}_ema": Option(ema, help="EMA decay of the weights used for sampling"),
    }


def diffusion_options() -> dict[str, Option]:
    return {
        "score_weighting": Option("sigma2", choices=WEIGHTINGS,
                                  help="sigma2: the DDPM eps-MSE (uniform t); g2: likelihood weighting"),
        "beta_min": Option(0.1),
        "beta_max": Option(20.0),
    }


def tiny_options(*prefixes: str) -> dict[str, Any]:
    """Networks and training runs small enough for the shared contract test (``test_options``)."""
    out: dict[str, Any] = {"unet_base": 8, "unet_mults": [1, 2], "mlp_hidden": 16, "mlp_depth": 2}
    for p in prefixes:
        out.update({f"{p}_steps": 4, f"{p}_batch": 8, f"{p}_warmup": 1})
    return out


def check_same_shape(method, data, why: str) -> None:
    """A one-line error when a method that needs one space for both domains gets two shapes."""
    if data.source_shape != data.shape:
        raise BenchError(f"{method.name} {why}, so source and target need one shape; got {data.source_shape} "
                         f"and {data.shape}: resize the task's sources")


# -- networks -----------------------------------------------------------------------------------
def network(shape: tuple[int, ...], o: dict[str, Any]) -> tuple[nn.Module, tuple[int, ...]]:
    """A time-conditional network net(x, t) -> x-shaped output, and the shape it works on."""
    if len(shape) == 3:
        c, h, w = shape
        mults = tuple(int(m) for m in o["unet_mults"])
        side = canvas_side(h, w, multiple=2 ** (len(mults) - 1))
        attention = tuple(side // 2 ** int(k) for k in o["unet_attention"])
        net = UNet(c, c, base=int(o["unet_base"]), mults=mults, num_res_blocks=int(o["unet_blocks"]),
                   attention_resolutions=attention, image_size=side)
        return net, (c, side, side)
    if len(shape) == 1:
        return ScoreMLP(int(shape[0]), hidden=int(o["mlp_hidden"]), depth=int(o["mlp_depth"])), tuple(shape)
    raise BenchError(f"no network for samples of shape {tuple(shape)}; tasks give (C, H, W) images or (D,) vectors")


def to_canvas(x: torch.Tensor, work_shape: tuple[int, ...]) -> torch.Tensor:
    """Images padded (background -1) to the network's canvas; vectors unchanged."""
    if x.dim() == 4 and x.shape[-1] != work_shape[-1]:
        return pad_to(x, work_shape[-1])
    return x


def from_canvas(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``to_canvas``, images clamped to [-1, 1]."""
    if x.dim() == 4:
        return crop_to(x, shape[-2], shape[-1]).clamp(-1, 1)
    return x


# -- the shared training loop -------------------------------------------------------------------
def fit_network(method, run, net: nn.Module, ema: EMA | None, loss_fn: Callable, *, loop: str, stream: str,
                optimizer: str, steps: int, lr: float, warmup: int = 0, grad_clip: float | None = None,
                weight_decay: float = 0.0, anneal: bool = False) -> None:
    """Minimise ``loss_fn(net, generator)`` by Adam (AdamW with ``weight_decay``) in the resumable
    loop ``loop``.

    The learning rate rises linearly over ``warmup`` steps (and, with ``anneal``, decays linearly to
    0 over the loop), gradients are clipped to ``grad_clip`` (0/None: not clipped), ``ema`` (if any)
    follows the weights; the loss is logged every 100 steps under the loop's name (a NaN stops the
    run).  ``optimizer`` names the optimizer state in the method's checkpoint, ``stream`` the random
    stream the loss draws from."""
    params = list(net.parameters())
    adam = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay
            else torch.optim.Adam(params, lr=lr))
    opt = method.optimizer(optimizer, adam)
    g = run.generator(stream)
    compiled = run.maybe_compile(net)
    warm = max(1, int(warmup))
    net.train()
    for step in run.loop(loop, steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm) * ((1.0 - step / steps) if anneal else 1.0)
        with run.autocast():
            loss = loss_fn(compiled, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        if ema is not None:
            ema.update(net)
        if run.should_log(step):
            run.log(loop, step, loss=loss)
    net.eval()


def dsm_batches(x: torch.Tensor, sde: VPSDE, batch: int, weighting: str) -> Callable:
    """The denoising score-matching loss on minibatches of ``x`` drawn with replacement."""

    def loss(net, g):
        x0 = x[torch.randint(0, len(x), (batch,), generator=g, device=x.device)]
        return dsm_loss(net, x0, sde, weighting=weighting, generator=g)
    return loss


class ScoreModel(nn.Module):
    """eps(x, t) of one domain on the VP-SDE: a network, its EMA copy (what ``forward`` uses)."""

    def __init__(self, shape: tuple[int, ...], o: dict[str, Any], prefix: str = "score"):
        super().__init__()
        self.shape, self.prefix = tuple(shape), prefix
        self.net, self.work_shape = network(self.shape, o)
        self.image = len(self.shape) == 3
        self.ema = EMA(self.net, decay=o[f"{prefix}_ema"])
        self.sde = VPSDE(o["beta_min"], o["beta_max"])

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        return to_canvas(x.float(), self.work_shape)

    def unprep(self, x: torch.Tensor) -> torch.Tensor:
        return from_canvas(x, self.shape)

    def fit(self, method, run, x: torch.Tensor, o: dict[str, Any], name: str) -> None:
        """DSM on the samples ``x`` in the loop (and optimizer) ``name``; stream ``<method>-<name>``."""
        x = self.prep(x).to(run.device)
        if self.image and run.device.type == "cuda":  # NHWC convolutions on the GPU
            self.net.to(memory_format=torch.channels_last)
            self.ema.module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        p = self.prefix
        fit_network(method, run, self.net, self.ema, dsm_batches(x, self.sde, o[f"{p}_batch"], o["score_weighting"]),
                    loop=name, stream=f"{method.name}-{name}", optimizer=name, steps=o[f"{p}_steps"],
                    lr=o[f"{p}_lr"], warmup=o[f"{p}_warmup"], grad_clip=o[f"{p}_grad_clip"])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return in_rows(self.ema, x, t)  # sampling on the CPU: 128 rows a call
