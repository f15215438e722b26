"""Ordinary differential equations of the flow and diffusion methods: integrators, the
flow-matching loss and deterministic diffusion encoders.

* **Integrators.**  ``integrate(f, x, t0, t1, steps, method)`` solves dx/dt = f(x, t) on a uniform
  grid from t0 to t1 (either direction) with Euler (1 evaluation per step) or Heun's method
  (the explicit trapezoidal rule, 2 evaluations per step).  ``f`` receives ``t`` as an (N,) tensor.
* **Flow matching / rectified flow** (Liu, Gong & Liu, ICLR 2023; Lipman et al. 2023): for pairs
  (x0, x1) and t ~ U[0, 1], x_t = t x1 + (1 - t) x0, the velocity field v minimises
  E || (x1 - x0) - v(x_t, t) ||^2 (``flow_matching_loss``, averaged over data dimensions like
  ``bench.diffusion.dsm_loss``).  ``straightness`` measures how far the learned flow is from
  straight lines: S = E_k E || (x1 - x0) - v(x_{t_k}, t_k) ||^2 along the Euler path from x0, with
  x1 the path's end (0 for a flow whose paths are straight, Liu et al.'s S(Z) on a grid).
* **Deterministic diffusion encoders** for a noise-prediction model of the VP-SDE
  (``bench.diffusion``).  ``ddim_encode`` runs the deterministic DDIM update forwards in time,
  x' = alpha' x0_hat + sigma' eps with x0_hat = (x - sigma eps) / alpha, from t_eps to T: the
  inverse of ``bench.diffusion.sample_ddim(eta=0)`` on the same grid up to the discretisation (DDIB
  encodes this way).  ``pf_velocity`` is the probability-flow ODE drift
  dx/dt = -1/2 beta(t) (x - eps(x, t) / sigma(t)), to integrate with ``integrate`` in either
  direction (``pf_encode`` / ``pf_decode``).
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import BenchError
from .diffusion import VPSDE, sample_ddim

METHODS = ("euler", "heun")


def evaluations(method: str, steps: int) -> int:
    """Network evaluations of ``integrate`` with this method and number of steps."""
    if method not in METHODS:
        raise BenchError(f"ODE method must be one of {', '.join(METHODS)}, got {method!r}")
    return int(steps) * (2 if method == "heun" else 1)


def time_grid(t0: float, t1: float, steps: int, device=None) -> torch.Tensor:
    if steps < 1:
        raise BenchError("ODE integrators need steps >= 1")
    return torch.linspace(float(t0), float(t1), steps + 1, device=device, dtype=torch.float64).float()


def integrate(f: Callable, x: torch.Tensor, t0: float, t1: float, steps: int, method: str = "euler",
              path: list | None = None) -> torch.Tensor:
    """Solve dx/dt = f(x, t) from t0 to t1 in ``steps`` uniform steps (Euler or Heun).

    With ``path`` (a list), every evaluation (t, x_t, f(x_t, t)) of the Euler nodes is appended to it."""
    evaluations(method, steps)
    ts = time_grid(t0, t1, steps, x.device)
    n = x.shape[0]
    x = x.float()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        d = f(x, t.expand(n)).float()
        if path is not None:
            path.append((t, x, d))
        if method == "euler":
            x = x + dt * d
        else:
            x_pred = x + dt * d
            d2 = f(x_pred, t_next.expand(n)).float()
            x = x + 0.5 * dt * (d + d2)
    return x


# -- flow matching ------------------------------------------------------------------------------
def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The straight path x_t = t x1 + (1 - t) x0 (t of shape (N,))."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    t = t.reshape(shape).to(x0.dtype)
    return t * x1 + (1.0 - t) * x0


def flow_matching_loss(net, x0: torch.Tensor, x1: torch.Tensor, generator=None, reduce: bool = True,
                       t: torch.Tensor | None = None) -> torch.Tensor:
    """E_t || (x1 - x0) - v(x_t, t) ||^2 with t ~ U[0, 1] (mean over data dimensions)."""
    if x0.shape != x1.shape:
        raise BenchError(f"flow matching needs pairs of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if t is None:
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    v = net(interpolate(x0, x1, t), t)
    per = (v.float() - (x1 - x0).float()).pow(2).flatten(1).mean(1)
    return per.mean() if reduce else per


@torch.no_grad()
def straightness(f: Callable, x0: torch.Tensor, steps: int, t0: float = 0.0, t1: float = 1.0) -> tuple[float, torch.Tensor]:
    """(S, x1): S = mean over the Euler nodes of E || (x1 - x0) / (t1 - t0) - f(x_t, t) ||^2 (mean over
    dimensions) along the Euler path of ``f`` from ``x0``, x1 its end point."""
    path: list = []
    x1 = integrate(f, x0, t0, t1, steps, "euler", path=path)
    chord = (x1 - x0.float()) / (t1 - t0)
    s = torch.stack([(chord - d).pow(2).flatten(1).mean(1) for _, _, d in path]).mean()
    return float(s), x1


# -- deterministic encoders of a VP noise-prediction model ----------------------------------------
def _call(net, x, t, cond):
    return net(x, t) if cond is None else net(x, t, cond)


@torch.no_grad()
def ddim_encode(net, x0: torch.Tensor, sde: VPSDE, steps: int, cond=None, t_end: float | None = None) -> torch.Tensor:
    """x0 (data at t_eps) -> x_T by the deterministic DDIM update run forwards in time (NFE = steps)."""
    return sample_ddim(net, x0.shape, sde, steps, cond=cond, x_T=x0, t_start=sde.t_eps,
                       t_end=sde.T if t_end is None else t_end, eta=0.0)


@torch.no_grad()
def ddim_decode(net, x_T: torch.Tensor, sde: VPSDE, steps: int, cond=None, t_start: float | None = None,
                clip_x0: bool = False) -> torch.Tensor:
    """x_T -> data by deterministic DDIM from ``t_start`` (default T) down to t_eps (NFE = steps);
    ``clip_x0`` clips the data prediction to [-1, 1] at every step (images)."""
    return sample_ddim(net, x_T.shape, sde, steps, cond=cond, x_T=x_T, t_start=t_start, eta=0.0, clip_x0=clip_x0)


def pf_velocity(net, sde: VPSDE, cond=None) -> Callable:
    """The probability-flow ODE drift of the VP-SDE for a noise-prediction network."""

    def f(x, t):
        shape = (-1,) + (1,) * (x.dim() - 1)
        eps = _call(net, x, t, cond).float()
        return -0.5 * sde.beta(t).reshape(shape) * (x - eps / sde.sigma(t).reshape(shape))
    return f


@torch.no_grad()
def pf_encode(net, x0: torch.Tensor, sde: VPSDE, steps: int, method: str = "heun", cond=None) -> torch.Tensor:
    """x0 -> x_T along the probability-flow ODE (NFE = ``evaluations(method, steps)``)."""
    return integrate(pf_velocity(net, sde, cond), x0, sde.t_eps, sde.T, steps, method)


@torch.no_grad()
def pf_decode(net, x_T: torch.Tensor, sde: VPSDE, steps: int, method: str = "heun", cond=None) -> torch.Tensor:
    """x_T -> data along the probability-flow ODE, from T down to t_eps."""
    return integrate(pf_velocity(net, sde, cond), x_T, sde.T, sde.t_eps, steps, method)


ENCODERS = ("ddim", "pf-euler", "pf-heun")


def encoder_evaluations(encoder: str, steps: int) -> int:
    if encoder not in ENCODERS:
        raise BenchError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    return int(steps) if encoder in ("ddim", "pf-euler") else 2 * int(steps)


def encode(net, x0: torch.Tensor, sde: VPSDE, steps: int, encoder: str = "ddim", cond=None) -> torch.Tensor:
    """Data -> latent x_T with the named deterministic encoder (``ENCODERS``)."""
    encoder_evaluations(encoder, steps)
    if encoder == "ddim":
        return ddim_encode(net, x0, sde, steps, cond)
    return pf_encode(net, x0, sde, steps, encoder[3:], cond)


def decode(net, x_T: torch.Tensor, sde: VPSDE, steps: int, encoder: str = "ddim", cond=None,
           clip_x0: bool = False) -> torch.Tensor:
    """Latent x_T -> data with the deterministic sampler matching ``encode``'s encoder (``clip_x0``:
    DDIM only, see ``bench.diffusion.sample_ddim``)."""
    encoder_evaluations(encoder, steps)
    if encoder == "ddim":
        return ddim_decode(net, x_T, sde, steps, cond, clip_x0=clip_x0)
    return pf_decode(net, x_T, sde, steps, encoder[3:], cond)
