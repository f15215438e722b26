"""One saddle-point (max-min) trainer for every adversarial OT method.

Neural OT solvers such as NOT / KNOT (Korotin et al. 2023), OTM (Rout et al. 2022), W2GAN
(Leygonie et al. 2019) and OT-ICNN (Makkuva et al. 2020) share one loop: a *critic* (the
potential f) is updated once, then the *map* (the transport T or the conjugate potential) is
updated ``inner_steps`` times (K_T in Algorithm 1 of NOT), repeated for ``steps`` outer steps.
:class:`SaddleTrainer` owns that loop, both Adam optimisers, their learning-rate schedules,
a random generator for batches and noise, and the logging; a method supplies only its two
loss callables::

    self.saddle = SaddleTrainer(self.T.parameters(), self.f.parameters(), steps=1000,
                                device=run.device, seed=run.seed)        # in setup()
    self.saddle.fit(run, "saddle", map_loss=..., critic_loss=...)        # in fit()

``map_loss(step)`` and ``critic_loss(step)`` return a scalar loss to *minimise* (or a pair
``(loss, {name: scalar})`` with extra values to log); ``step`` is the outer step, e.g. for a
schedule of the cost.  While the critic is updated the map's parameters do not require
gradients (so the map's forward pass builds no graph), and vice versa.

The two Adam optimisers are registered with the method (``Method.optimizer``, the one checkpoint
mechanism of every plugin) when the trainer is built by :meth:`SaddleTrainer.from_options`; the
trainer itself is an ``nn.Module`` without parameters whose ``state_dict`` holds only its random
generator, so a method that keeps it as an attribute gets it saved and resumed with no extra code.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import BenchError
from .options import Option

LR_SCHEDULES = ("constant", "multistep", "cosine")

# The trainer's options as a method exposes them (merge into ``default_options``); iteration
# counts default to None = "the budget decides" (see SaddleTrainer.from_options).
SADDLE_OPTIONS: dict[str, Any] = {
    "steps": Option(smoke=400, cpu=4000, fast=5000, paper=10_000, help="outer (critic) steps"),
    "inner_steps": Option(10, help="K_T: map steps per critic step (authors: 10)"),
    "batch_size": 64,
    "map_lr": 1e-4,
    "critic_lr": 1e-4,
    "betas": Option([0.9, 0.999], help="Adam betas (authors: torch's defaults)"),
    "weight_decay": Option(1e-10, help="Adam weight decay (authors: 1e-10)"),
    "critic_first": Option(False, help="update the critic before the map in each outer step "
                                       "(authors: the K_T map steps come first)"),
    "lr_schedule": Option("constant", choices=LR_SCHEDULES),
    "lr_milestones": Option([], type=list, help="fractions of the outer steps (multistep)"),
    "lr_decay": 0.5,
    "grad_clip": Option(None, type=float),
    "log_every": 100,
}

LossFn = Callable[[int], "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]


def lr_factor(schedule: str, step: int, total: int, milestones: Iterable[float] = (),
              factor: float = 0.5) -> float:
    """Multiplier of the base learning rate after ``step`` of ``total`` outer steps.

    ``multistep``: times ``factor`` at each milestone (given as fractions of ``total``);
    ``cosine``: half a cosine from 1 down to 0 over ``total``; ``constant``: 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return factor ** sum(step >= int(round(m * total)) for m in milestones)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise BenchError(f"unknown lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


def _set_requires_grad(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


class SaddleTrainer(nn.Module):
    """Alternating critic / map optimisation: one critic step, then ``inner_steps`` map steps.

    Parameters
    ----------
    map_params, critic_params: the parameters of the map (minimised) and the critic.
    steps: outer (critic) steps; the map takes ``steps * inner_steps`` steps.
    inner_steps: K_T, map steps per critic step.
    critic_steps: critic updates per outer step (W2GAN: 5 discriminator steps per generator step).
    map_lr, critic_lr, betas, weight_decay: Adam settings of the two optimisers.
    lr_schedule, lr_milestones, lr_decay: see :func:`lr_factor`; applied to both optimisers
        per outer step.
    grad_clip: clip each update's gradient norm to this value (None: no clipping).
    device, seed: the device and seed of :attr:`generator` (batches and noise).
    """

    def __init__(self, map_params: Iterable[nn.Parameter], critic_params: Iterable[nn.Parameter], *,
                 steps: int, inner_steps: int = 10, map_lr: float = 1e-4, critic_lr: float = 1e-4,
                 betas: tuple[float, float] = (0.0, 0.9), weight_decay: float = 0.0,
                 lr_schedule: str = "constant", lr_milestones: Iterable[float] = (), lr_decay: float = 0.5,
                 grad_clip: float | None = None, device: torch.device | str = "cpu", seed: int = 0,
                 critic_first: bool = False, critic_steps: int = 1):
        super().__init__()
        if steps < 1 or inner_steps < 1 or critic_steps < 1:
            raise BenchError(f"saddle trainer needs steps, inner_steps and critic_steps >= 1 "
                             f"(got {steps}, {inner_steps}, {critic_steps})")
        if lr_schedule not in LR_SCHEDULES:
            raise BenchError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        self.map_params = [p for p in map_params]
        self.critic_params = [p for p in critic_params]
        self.steps, self.inner_steps, self.critic_steps = int(steps), int(inner_steps), int(critic_steps)
        self.schedule = (lr_schedule, tuple(float(m) for m in lr_milestones), float(lr_decay))
        self.grad_clip = grad_clip
        self.critic_first = bool(critic_first)
        betas = tuple(float(b) for b in betas)
        self.map_opt = torch.optim.Adam(self.map_params, lr=map_lr, betas=betas, weight_decay=weight_decay)
        self.critic_opt = torch.optim.Adam(self.critic_params, lr=critic_lr, betas=betas, weight_decay=weight_decay)
        self.base_lrs = (float(map_lr), float(critic_lr))
        self._seed = int(seed)
        self.owns_optimizers = True  # False once a method checkpoints them (from_options(..., method))
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(self._seed * 1_000_003 + 7919)

    @classmethod
    def from_options(cls, map_params, critic_params, options: dict[str, Any], run, method=None) -> "SaddleTrainer":
        """Build from a method's resolved options (keys of :data:`SADDLE_OPTIONS`) and its run; with
        ``method``, the two optimisers are registered with it (checkpointed and restored there)."""
        trainer = cls(map_params, critic_params, steps=int(options["steps"]), inner_steps=int(options["inner_steps"]),
                   map_lr=float(options["map_lr"]), critic_lr=float(options["critic_lr"]),
                   betas=tuple(options["betas"]), weight_decay=float(options["weight_decay"]),
                   lr_schedule=options["lr_schedule"], lr_milestones=options["lr_milestones"],
                   lr_decay=float(options["lr_decay"]), grad_clip=options["grad_clip"],
                   device=run.device, seed=run.seed, critic_first=bool(options.get("critic_first", False)),
                   critic_steps=int(options.get("critic_steps", 1)))
        if method is not None:
            trainer.map_opt = method.optimizer("saddle-map", trainer.map_opt)
            trainer.critic_opt = method.optimizer("saddle-critic", trainer.critic_opt)
            trainer.owns_optimizers = False
        return trainer

    # -- randomness -------------------------------------------------------------------------
    def batch(self, data: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` rows of ``data`` drawn uniformly with replacement (``data`` on the trainer's device)."""
        idx = torch.randint(0, data.shape[0], (n,), generator=self.generator, device=self.generator.device)
        return data[idx.to(data.device)]

    def randn(self, *shape: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.generator.device,
                           dtype=dtype).to(device or self.generator.device)

    def to(self, *args, **kwargs):  # keep the generator on the parameters' device
        out = super().to(*args, **kwargs)
        device = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else kwargs.get("device")
        if device is not None and torch.device(device).type != self.generator.device.type:
            state = self.generator.get_state()
            self.generator = torch.Generator(device=torch.device(device))
            self._set_generator_state(state)
        return out

    def _set_generator_state(self, state: torch.Tensor) -> None:
        try:
            self.generator.set_state(state)
        except (RuntimeError, TypeError, ValueError):  # state from another device type: reseed
            self.generator.manual_seed(self._seed * 1_000_003 + 7919 + int(state.long().sum()))

    # -- state ------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs) -> dict[str, Any]:  # noqa: D102 (nn.Module signature)
        state = {"generator": self.generator.get_state()}
        if self.owns_optimizers:
            state.update(map_opt=self.map_opt.state_dict(), critic_opt=self.critic_opt.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False):
        if self.owns_optimizers and "map_opt" in state:
            self.map_opt.load_state_dict(state["map_opt"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        self._set_generator_state(state["generator"].cpu())

    # -- the loop ---------------------------------------------------------------------------
    def _set_lrs(self, step: int) -> float:
        schedule, milestones, decay = self.schedule
        k = lr_factor(schedule, step, self.steps, milestones, decay)
        for opt, base in ((self.map_opt, self.base_lrs[0]), (self.critic_opt, self.base_lrs[1])):
            for group in opt.param_groups:
                group["lr"] = base * k
        return k

    def _update(self, loss_fn: LossFn, step: int, opt: torch.optim.Optimizer,
                params: list[nn.Parameter], run) -> tuple[torch.Tensor, dict[str, Any]]:
        opt.zero_grad(set_to_none=True)
        with run.autocast():
            out = loss_fn(step)
        loss, extra = (out if isinstance(out, tuple) else (out, {}))
        loss.float().backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()
        return loss.detach(), extra

    def _critic_step(self, critic_loss: LossFn, step: int, run):
        _set_requires_grad(self.map_params, False)
        _set_requires_grad(self.critic_params, True)
        for _ in range(self.critic_steps):
            out = self._update(critic_loss, step, self.critic_opt, self.critic_params, run)
        return out

    def fit(self, run, stage: str, *, map_loss: LossFn, critic_loss: LossFn,
            log_every: int = 100) -> None:
        """Run the outer loop as ``run.loop(stage, steps)`` (resumable, checkpointed)."""
        for step in run.loop(stage, self.steps):
            k = self._set_lrs(step)
            if self.critic_first:
                f_loss, f_extra = self._critic_step(critic_loss, step, run)
            _set_requires_grad(self.critic_params, False)
            _set_requires_grad(self.map_params, True)
            for _ in range(self.inner_steps):
                t_loss, t_extra = self._update(map_loss, step, self.map_opt, self.map_params, run)
            if not self.critic_first:
                f_loss, f_extra = self._critic_step(critic_loss, step, run)
            _set_requires_grad(self.critic_params, True)
            _set_requires_grad(self.map_params, True)
            if run.should_log(step, log_every) or step == self.steps - 1:
                run.log(stage, step, critic_loss=f_loss, map_loss=t_loss, lr_factor=k,
                        **{f"critic_{n}": v for n, v in f_extra.items()},
                        **{f"map_{n}": v for n, v in t_extra.items()})
