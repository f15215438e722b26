"""Scores of a transport map against a known optimal one (Korotin et al., "Do neural optimal transport
solvers work? A continuous Wasserstein-2 benchmark", NeurIPS 2021, section 4).

With P the source, Q the target, T* the exact quadratic-cost OT map and T_hat a fitted map:

- ``l2_uvp``  = 100 * E_P ||T_hat(x) - T*(x)||^2 / Var(Q)   (unexplained variance, %; 0 is exact,
  100 is as bad as sending everything to the mean of Q);
- ``bw2_uvp`` = 100 * BW2^2(T_hat # P, Q) / Var(Q), where BW2 is the Bures-Wasserstein distance between
  the Gaussian fits (mean, covariance) of the two distributions: a check of the output marginal only
  (the paper writes both with the 1/2 of its W2 convention in numerator and denominator; it cancels);
- ``cos``     = <T_hat - id, T* - id>_P / (||T_hat - id||_P ||T* - id||_P), the cosine between the
  fitted and the exact displacement fields (1 is the right direction everywhere).

Var(Q) is the total variance E||y - E y||^2 (the trace of the covariance).  Every routine works in
float64 on the CPU; inputs may be torch tensors or numpy arrays.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def sqrtm_psd(S) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    S = _np(S)
    S = (S + S.T) / 2
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def gaussian_fit(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the rows of x (N, D)."""
    x = _np(x).reshape(len(x), -1)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def gaussian_ot_map(m1, S1, m2, S2) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of the quadratic-cost OT map T(x) = A x + b from N(m1, S1) to N(m2, S2) (S1 non-singular):
    A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}, symmetric positive definite, b = m2 - A m1."""
    m1, S1, m2, S2 = _np(m1), _np(S1), _np(m2), _np(S2)
    r = sqrtm_psd(S1)
    w, V = np.linalg.eigh((S1 + S1.T) / 2)
    r_inv = (V / np.sqrt(w)) @ V.T
    A = r_inv @ sqrtm_psd(r @ S2 @ r) @ r_inv
    A = (A + A.T) / 2
    return A, m2 - A @ m1


def bures_w2_sq(m1, S1, m2, S2) -> float:
    """W2^2 between N(m1, S1) and N(m2, S2): ||m1 - m2||^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2."""
    m1, S1, m2, S2 = _np(m1), _np(S1), _np(m2), _np(S2)
    r = sqrtm_psd(S1)
    cross = np.trace(sqrtm_psd(r @ S2 @ r))
    return float(max(np.sum((m1 - m2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * cross, 0.0))


def l2_uvp(mapped, exact, var_target: float) -> float:
    """100 * mean ||mapped - exact||^2 / Var(Q) over the rows (the same sources in the same order)."""
    d = _np(mapped).reshape(len(mapped), -1) - _np(exact).reshape(len(exact), -1)
    return float(100.0 * (d ** 2).sum(1).mean() / var_target)


def bw2_uvp(outputs, mean_target, cov_target, var_target: float) -> float:
    """100 * BW2^2(Gaussian fit of the outputs, (mean_target, cov_target)) / Var(Q)."""
    m, S = gaussian_fit(outputs)
    return float(100.0 * bures_w2_sq(m, S, mean_target, cov_target) / var_target)


def displacement_cosine(x, mapped, exact) -> float:
    """Cosine between the displacement fields mapped - x and exact - x in L2 of the sources."""
    x = _np(x).reshape(len(x), -1)
    u = _np(mapped).reshape(len(x), -1) - x
    v = _np(exact).reshape(len(x), -1) - x
    den = np.sqrt((u ** 2).sum(1).mean() * (v ** 2).sum(1).mean())
    return float((u * v).sum(1).mean() / den) if den > 0 else 0.0


def barycentric(transport: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The barycentric projection E[T(x, z) | x] of a stochastic map, estimated from ``draws`` samples per
    source (``transport`` maps a batch of sources to one sample each): (means (N, D), the unbiased
    within-source variance tr Var(T(x, .)) per source (N,), float64)."""
    if draws < 2:
        raise ValueError("the barycentric projection needs at least 2 draws per source")
    y = transport(x.repeat_interleave(draws, 0)).double().cpu().reshape(len(x), draws, -1)
    return y.mean(1), y.var(1, unbiased=True).sum(1)
