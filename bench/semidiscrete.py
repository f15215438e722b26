"""Semi-discrete optimal transport (quadratic cost) by stochastic gradient on the dual vector.

A continuous measure mu (known only through a sampler) is transported onto a discrete target
set {y_i} with weights nu_i.  With cost |x - y|^2 / 2 the Brenier potential is piecewise
linear,
    u_h(x) = max_i  <x, y_i> + h_i,
its gradient is the OT map  T(x) = y_{argmax_i <x, y_i> + h_i},  and the cells (a power diagram)
W_i(h) = {x : i attains the max} must carry mass nu_i.  h minimises the convex energy
    E(h) = int u_h dmu - sum_i nu_i h_i,     dE/dh_i = mu(W_i(h)) - nu_i,
so gradient ascent on -E (the Kantorovich dual) moves h_i up while cell i holds less mass than
nu_i.  The cell masses are Monte-Carlo estimates from sampler batches.

Update rule (the AE-OT / DPM-OT recipe, re-implemented): Adam on the gradient estimate, h
re-centred to zero mean (E is invariant to a constant shift); the best h since the last
refinement (smallest ||grad||_2 estimate) is kept; when ||grad|| has not improved for
``patience`` steps the Monte-Carlo sample is doubled (at most ``max_doublings`` times) and the
learning rate multiplied by 0.8.  Differences from the authors' solver, on purpose:
h is initialised at -|y_i|^2 / 2 (the power diagram starts as the Voronoi diagram, i.e. the
nearest-neighbour map, instead of the max-inner-product map), and the learning rate is relative
to the median gap between the best and second-best score over the first batch, so one default
works for 2-D toys and 1024-D image latents alike.

Everything is vectorised: scores are computed for a batch of points against blocks of
``block`` targets at a time (one matmul per block, a running argmax), and the state lives in
buffers, so the solver moves with ``.to(device)``, is saved by ``state_dict`` and resumes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import BenchError

Sampler = Callable[[int, "torch.Generator | None"], torch.Tensor]


class SemiDiscreteOT(nn.Module):
    def __init__(self, targets: torch.Tensor, weights: torch.Tensor | None = None, block: int = 4096,
                 patience: int = 50, max_doublings: int = 3):
        super().__init__()
        if targets.dim() < 2 or len(targets) < 1:
            raise BenchError("SemiDiscreteOT needs targets of shape (N, ...) with N >= 1")
        n = len(targets)
        y = targets.detach().reshape(n, -1).float()
        if weights is None:
            w = torch.full((n,), 1.0 / n, device=y.device)
        else:
            w = weights.detach().reshape(-1).float().to(y.device)
            if len(w) != n or bool((w < 0).any()):
                raise BenchError("SemiDiscreteOT weights must be N non-negative numbers")
            w = w / w.sum()
        self.target_shape = tuple(targets.shape[1:])
        self.block, self.patience, self.max_doublings = int(block), int(patience), int(max_doublings)
        self.register_buffer("targets", y)
        self.register_buffer("weights", w)
        self.register_buffer("h", torch.zeros(n, device=y.device))
        self.register_buffer("h_best", torch.zeros(n, device=y.device))
        self.register_buffer("adam_m", torch.zeros(n, device=y.device))
        self.register_buffer("adam_v", torch.zeros(n, device=y.device))
        # scalars: steps taken, lr scale (0 = not yet set), lr decay factor, best grad norm,
        # steps since improvement, number of doublings
        self.register_buffer("n_steps", torch.zeros((), dtype=torch.long, device=y.device))
        self.register_buffer("scale", torch.zeros((), device=y.device))
        self.register_buffer("lr_factor", torch.ones((), device=y.device))
        self.register_buffer("best_gnorm", torch.full((), float("inf"), device=y.device))
        self.register_buffer("count_bad", torch.zeros((), dtype=torch.long, device=y.device))
        self.register_buffer("doublings", torch.zeros((), dtype=torch.long, device=y.device))
        self.reset_potential()

    # -- the potential and the map ------------------------------------------------------------
    @torch.no_grad()
    def set_targets(self, targets: torch.Tensor) -> None:
        """Replace the target set (same N and shape) and restart the solver from scratch."""
        self.targets.copy_(targets.detach().reshape(len(targets), -1).float())
        self.reset_potential()

    @torch.no_grad()
    def reset_potential(self) -> None:
        self.h.copy_(-0.5 * self.targets.pow(2).sum(1))
        self.h.sub_(self.h.mean())
        self.h_best.copy_(self.h)
        for b in (self.adam_m, self.adam_v, self.n_steps, self.scale, self.count_bad, self.doublings):
            b.zero_()
        self.lr_factor.fill_(1.0)
        self.best_gnorm.fill_(float("inf"))
        self._host = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.targets.shape[1]:
            raise BenchError(f"SemiDiscreteOT: points have {x.shape[1]} coordinates, targets {self.targets.shape[1]}")
        return x.to(self.targets.dtype)

    @torch.no_grad()
    def top2(self, x: torch.Tensor, h: torch.Tensor | None = None):
        """Best score, its index, and the second-best score of <x, y_i> + h_i (blocked over i)."""
        x = self._flat(x)
        h = self.h if h is None else h
        best = torch.full((len(x),), -float("inf"), device=x.device)
        second = best.clone()
        idx = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for s in range(0, len(self.targets), self.block):
            scores = x @ self.targets[s:s + self.block].T + h[s:s + self.block]
            k = min(2, scores.shape[1])
            vals, ids = scores.topk(k, dim=1)
            v1, i1 = vals[:, 0], ids[:, 0] + s
            v2 = vals[:, 1] if k == 2 else torch.full_like(v1, -float("inf"))
            new_best = v1 > best
            second = torch.where(new_best, torch.maximum(best, v2), torch.maximum(second, v1))
            idx = torch.where(new_best, i1, idx)
            best = torch.where(new_best, v1, best)
        return best, idx, second

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the target cell of each point: argmax_i <x, y_i> + h_i."""
        return self.top2(x)[1]

    @torch.no_grad()
    def map(self, x: torch.Tensor) -> torch.Tensor:
        """The semi-discrete OT map T(x) = y_{assign(x)}, shaped like the targets."""
        return self.targets[self.assign(x)].reshape(len(x), *self.target_shape)

    @torch.no_grad()
    def cell_masses(self, x: torch.Tensor) -> torch.Tensor:
        """Empirical mass of each cell under the points ``x``."""
        return torch.bincount(self.assign(x), minlength=len(self.targets)).float() / len(x)

    # -- the dual ascent ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, sampler: Sampler, batch: int, lr: float = 0.05, generator=None) -> torch.Tensor:
        """One Adam step on h from ``batch * 2**doublings`` sampler points; returns ||grad||_2
        (a device tensor: no host synchronisation)."""
        if self._host is None:  # (doublings, scale set?) read from the buffers once, not every step
            self._host = (int(self.doublings), float(self.scale) > 0)
        reps = 1 << self._host[0]
        counts = torch.zeros_like(self.h)
        for _ in range(reps):
            x = sampler(batch, generator)
            best, idx, second = self.top2(x)
            if not self._host[1]:
                gap = best - second
                gap = gap[torch.isfinite(gap)]
                self.scale.copy_(gap.median() if len(gap) else torch.ones((), device=gap.device))
                self.scale.clamp_(min=1e-6)
                self._host = (self._host[0], True)
            counts += torch.bincount(idx, minlength=len(self.h)).float()
        grad = counts / (reps * batch) - self.weights  # dE/dh = mu(W) - nu
        b1, b2 = 0.9, 0.999
        self.n_steps += 1
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.n_steps.float()
        m_hat = self.adam_m / (1 - b1 ** t)
        v_hat = self.adam_v / (1 - b2 ** t)
        delta = -(lr * self.scale * self.lr_factor) * m_hat / (v_hat.sqrt() + 1e-12)
        self.h.add_(delta - delta.mean())
        gnorm = grad.norm()
        better = gnorm < self.best_gnorm
        self.h_best.copy_(torch.where(better, self.h - (delta - delta.mean()), self.h_best))
        self.best_gnorm.copy_(torch.where(better, gnorm, self.best_gnorm))
        self.count_bad.copy_(torch.where(better, torch.zeros_like(self.count_bad), self.count_bad + 1))
        return gnorm

    @torch.no_grad()
    def refine(self) -> bool:
        """If ||grad|| has not improved for ``patience`` steps: double the sample, lr *= 0.8.
        One host synchronisation; call it every few dozen steps.  True when it refined."""
        if int(self.count_bad) > self.patience and int(self.doublings) < self.max_doublings:
            self.doublings += 1
            self._host = None
            self.lr_factor.mul_(0.8)
            self.count_bad.zero_()
            self.best_gnorm.fill_(float("inf"))
            return True
        return False

    @torch.no_grad()
    def use_best(self) -> None:
        """Adopt the potential with the smallest gradient-norm estimate since the last refinement."""
        if torch.isfinite(self.best_gnorm):
            self.h.copy_(self.h_best)

    def fit(self, sampler: Sampler, steps: int, batch: int = 1024, lr: float = 0.05,
            generator: torch.Generator | None = None, refine_every: int = 25,
            callback: Callable[[int, torch.Tensor], None] | None = None) -> "SemiDiscreteOT":
        """Run ``steps`` dual steps (``lr`` relative to the median top-2 score gap)."""
        for k in range(steps):
            gnorm = self.step(sampler, batch, lr, generator)
            if callback is not None:
                callback(k, gnorm)
            if (k + 1) % refine_every == 0:
                self.refine()
        self.use_best()
        return self
