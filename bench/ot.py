"""Optimal-transport building blocks shared by the OT-based methods and the toy tasks.

Conventions (uniform empirical measures p = 1/n, q = 1/m on the training sets):

* A *cost* maps two batches (N, ...) and (M, ...) to an (N, M) matrix.  Inputs are flattened.
  ``"mean-squared"`` is the mean over coordinates of the squared difference, ``"mean-l1"`` the
  mean absolute difference, ``"cosine"`` is 1 - cos, or pass any callable.
* The L2-regularised OT problem of OTCS (Gu et al., NeurIPS 2023, eq. 5) is

      min_pi  E_pi[xi] + eps * E_{p x q}[(dpi / d(p x q))^2]   s.t. pi in Pi(p, q) (and pi = 0 off the mask)

  with dual  max_{u,v}  E_p u + E_q v - 1/(4 eps) E_{p x q}[ I (u + v - xi)_+^2 ]  and optimal
  density ("compatibility") H = dpi/d(p x q) = I (u + v - xi)_+ / (2 eps).
  For uniform weights this is POT's ``smooth_ot_dual(a, b, C, reg=2*eps*n*m, reg_type='l2')``:
  POT's dual variables *are* u, v and its plan is H / (n m).
* The semi-supervised (keypoint-guided) cost xi = alpha * c + (1 - alpha) * g with g the
  Jensen-Shannon divergence between relation vectors to the K keypoints (KPG-RL, Gu et al.
  2022); alpha is the weight of the plain cost (alpha = 0 is the paper's semi-supervised OT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from .errors import BenchError

COSTS = ("mean-squared", "mean-l1", "cosine")
_ALIASES = {"l2": "mean-squared", "sq": "mean-squared", "l1": "mean-l1"}
COST_NAMES = COSTS + tuple(_ALIASES)


# ---------------------------------------------------------------------------------------------
# costs and keypoint guidance
# ---------------------------------------------------------------------------------------------
def cost_matrix(x: torch.Tensor, y: torch.Tensor, cost: str | Callable = "mean-squared") -> torch.Tensor:
    """(N, ...) x (M, ...) -> (N, M) cost matrix, computed in float32 (or the inputs' float64)."""
    if callable(cost):
        return cost(x, y)
    name = _ALIASES.get(cost, cost)
    dtype = torch.float64 if (x.dtype == torch.float64 or y.dtype == torch.float64) else torch.float32
    x = x.reshape(len(x), -1).to(dtype)
    y = y.reshape(len(y), -1).to(dtype)
    if x.shape[1] != y.shape[1]:
        raise BenchError(f"cost {name!r} needs equal dimensions, got {x.shape[1]} and {y.shape[1]}; "
                         "use a feature map or a callable cost")
    d = x.shape[1]
    if name == "mean-squared":
        sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
        return sq.clamp_min_(0.0) / d
    if name == "mean-l1":
        return torch.cdist(x, y, p=1) / d
    if name == "cosine":
        xn = torch.nn.functional.normalize(x, dim=1)
        yn = torch.nn.functional.normalize(y, dim=1)
        return 1.0 - xn @ yn.T
    raise BenchError(f"unknown cost {cost!r}; choose one of {', '.join(COSTS)} or pass a callable")


def relation_vectors(x: torch.Tensor, keypoints: torch.Tensor, cost="mean-squared", tau: float = 0.1) -> torch.Tensor:
    """R_x = softmax_k(-c(x, x_k) / tau): how each point relates to the K keypoints, (N, K)."""
    return torch.softmax(-cost_matrix(x, keypoints, cost) / tau, dim=1)


def js_matrix(P: torch.Tensor, Q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Jensen-Shannon divergences (natural log) between the rows of P (N, K) and Q (M, K): (N, M)."""
    P = P.clamp_min(0)
    Q = Q.clamp_min(0)
    ent_p = (P * torch.log(P + eps)).sum(1)  # sum p log p
    ent_q = (Q * torch.log(Q + eps)).sum(1)
    mix = 0.5 * (P[:, None, :] + Q[None, :, :])
    cross = (mix * torch.log(mix + eps)).sum(-1)  # sum m log m
    return (0.5 * (ent_p[:, None] + ent_q[None, :]) - cross).clamp_min(0.0)


def guiding_cost(x, y, kx, ky, cost="mean-squared", tau: float = 0.1, tau_target: float | None = None,
                 alpha: float = 0.0, rel_x: torch.Tensor | None = None, rel_y: torch.Tensor | None = None):
    """xi(x, y) = alpha * c(x, y) + (1 - alpha) * JS(R^s_x, R^t_y) for keypoints (kx, ky).

    ``rel_x`` / ``rel_y`` may pass precomputed relation vectors of x / y.
    """
    tau_target = tau if tau_target is None else tau_target
    rx = relation_vectors(x, kx, cost, tau) if rel_x is None else rel_x
    ry = relation_vectors(y, ky, cost, tau_target) if rel_y is None else rel_y
    g = js_matrix(rx, ry)
    if alpha == 0:
        return g
    return alpha * cost_matrix(x, y, cost) + (1.0 - alpha) * g


def keypoint_mask(rows: torch.Tensor, cols: torch.Tensor, src_key: torch.Tensor, tgt_key: torch.Tensor) -> torch.Tensor:
    """Mask m (len(rows), len(cols)) of the KPG model for a block of the training index sets.

    ``rows`` / ``cols`` are global indices; ``src_key[k]`` / ``tgt_key[k]`` are the global indices
    of the k-th guiding pair.  A guiding source may only be matched to its own guiding target and
    a guiding target only receives mass from its own guiding source; every other pair is allowed.
    """
    dev = rows.device
    n_idx = int(max(rows.max().item() if len(rows) else 0, src_key.max().item() if len(src_key) else 0)) + 1
    m_idx = int(max(cols.max().item() if len(cols) else 0, tgt_key.max().item() if len(tgt_key) else 0)) + 1
    partner_of_row = torch.full((n_idx,), -1, dtype=torch.long, device=dev)
    partner_of_row[src_key.to(dev)] = tgt_key.to(dev)
    partner_of_col = torch.full((m_idx,), -1, dtype=torch.long, device=dev)
    partner_of_col[tgt_key.to(dev)] = src_key.to(dev)
    pr = partner_of_row[rows][:, None]  # (b, 1)
    pc = partner_of_col[cols][None, :]  # (1, m)
    row_free = pr < 0
    col_free = pc < 0
    tied = (pr == cols[None, :]) & (pc == rows[:, None])
    return ((row_free & col_free) | tied).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# the L2-regularised dual and the compatibility function
# ---------------------------------------------------------------------------------------------
def dual_l2_objective(u: torch.Tensor, v: torch.Tensor, xi: torch.Tensor, eps: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Minibatch estimate of the dual  E u + E v - 1/(4 eps) E[I (u + v - xi)_+^2]  (to maximise)."""
    u = u.reshape(-1, 1)
    v = v.reshape(1, -1)
    pen = torch.relu(u + v - xi) ** 2
    if mask is not None:
        pen = pen * mask
    return u.mean() + v.mean() - pen.mean() / (4.0 * eps)


def dual_entropic_objective(u: torch.Tensor, v: torch.Tensor, xi: torch.Tensor, eps: float) -> torch.Tensor:
    """Minibatch estimate of the entropic (KL) dual  E u + E v - eps E_{p x q}[exp((u + v - xi) / eps - 1)]
    (to maximise; SCONES, Daniels et al. 2021).  Its optimal density is H = exp((u + v - xi) / eps - 1)
    (``entropic_log_compatibility``), the plan of min E_pi[xi] + eps KL(pi | p x q)."""
    return u.mean() + v.mean() - eps * torch.exp(entropic_log_compatibility(u, v, xi, eps)).mean()


def entropic_log_compatibility(u: torch.Tensor, v: torch.Tensor, xi: torch.Tensor, eps: float) -> torch.Tensor:
    """log H(x, y) = (u(x) + v(y) - xi(x, y)) / eps - 1 for the entropic dual; ``xi`` (N, M) with
    u (N,) and v (M,), or all three (N,) for aligned pairs."""
    if xi.dim() == 2:
        u, v = u.reshape(-1, 1), v.reshape(1, -1)
    else:
        u, v = u.reshape(xi.shape), v.reshape(xi.shape)
    return (u + v - xi) / eps - 1.0


def compatibility(u: torch.Tensor, v: torch.Tensor, xi: torch.Tensor, eps: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """H(x, y) = I (u(x) + v(y) - xi(x, y))_+ / (2 eps), the density of pi_hat w.r.t. p x q."""
    h = torch.relu(u.reshape(-1, 1) + v.reshape(1, -1) - xi) / (2.0 * eps)
    return h if mask is None else h * mask


@dataclass
class SparseCompatibility:
    """H stored row-wise (CSR): row i keeps the targets ``col[crow[i]:crow[i+1]]`` with values ``val``.

    ``row_mean`` / ``col_mean`` are the exact marginals (1/m) sum_j H_ij and (1/n) sum_i H_ij of the
    *dense* H (before thresholding); ``kept_mass`` is the share of the total H mass that was stored.
    """

    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    row_mean: torch.Tensor
    col_mean: torch.Tensor
    kept_mass: float

    @property
    def n_rows(self) -> int:
        return len(self.crow) - 1

    def row_nnz(self) -> torch.Tensor:
        return self.crow[1:] - self.crow[:-1]

    @cached_property
    def cumulative(self) -> torch.Tensor:
        """Running sum of ``val`` in float64, computed once: drawing j within a row is an inverse-CDF lookup
        in it (recomputing it per batch cost ~0.6 s a step with ~1e8 stored entries on the CPU)."""
        return torch.cumsum(self.val.double(), 0)

    def empty_rows(self) -> torch.Tensor:
        return torch.nonzero(self.row_nnz() == 0).flatten()

    def to_dense(self, n_cols: int) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.crow.device), self.row_nnz())
        out = torch.zeros(self.n_rows, n_cols, dtype=self.val.dtype, device=self.val.device)
        out[rows, self.col] = self.val
        return out

    def marginal_violation(self) -> tuple[float, float]:
        """(E_x |E_y H(x, y) - 1|, E_y |E_x H(x, y) - 1|) on the training sets."""
        return (float((self.row_mean - 1).abs().mean()), float((self.col_mean - 1).abs().mean()))


@torch.no_grad()
def sparse_compatibility(u: torch.Tensor, v: torch.Tensor, xi_block: Callable[[int, int], torch.Tensor],
                         eps: float, threshold: float = 0.1, max_per_row: int | None = None,
                         block_rows: int = 1024, mask_block: Callable[[int, int], torch.Tensor] | None = None,
                         progress: Callable[[int], None] | None = None,
                         max_nnz: int | None = None) -> SparseCompatibility:
    """H for all n x m training pairs, computed ``block_rows`` rows at a time on u's device.

    ``xi_block(i0, i1)`` returns the (i1 - i0, m) cost block for source rows i0:i1 and
    ``mask_block(i0, i1)`` the matching mask (or None).  Entries with H > ``threshold`` are kept
    (at most the ``max_per_row`` largest per row).  The marginals use every entry.  More than
    ``max_nnz`` stored entries in all is a one-line error (memory), never a silent truncation.
    """
    n, m = len(u), len(v)
    crows = [torch.zeros(1, dtype=torch.long, device=u.device)]
    cols, vals = [], []
    row_mean = torch.zeros(n, dtype=torch.float64, device=u.device)
    col_sum = torch.zeros(m, dtype=torch.float64, device=u.device)
    total = torch.zeros((), dtype=torch.float64, device=u.device)
    kept = torch.zeros((), dtype=torch.float64, device=u.device)
    offset = torch.zeros((), dtype=torch.long, device=u.device)
    for i0 in range(0, n, block_rows):
        i1 = min(n, i0 + block_rows)
        h = compatibility(u[i0:i1].float(), v.float(), xi_block(i0, i1).float(), eps,
                          None if mask_block is None else mask_block(i0, i1))
        row_mean[i0:i1] = h.double().mean(1)
        col_sum += h.double().sum(0)
        total += h.double().sum()
        keep = h > threshold
        if max_per_row is not None and max_per_row < m:
            kth = torch.topk(h, max_per_row, dim=1).values[:, -1:]
            keep &= h >= kth
        r, c = torch.nonzero(keep, as_tuple=True)
        hv = h[r, c]
        kept += hv.double().sum()
        counts = torch.bincount(r, minlength=i1 - i0)
        crows.append(offset + torch.cumsum(counts, 0))
        offset = offset + counts.sum()
        if max_nnz is not None and int(offset) > max_nnz:
            raise BenchError(f"the compatibility H would store more than {max_nnz:,} entries (after {i1} of {n} "
                             f"rows): epsilon is large for this problem; raise h_threshold, set h_max_per_row, "
                             f"or raise h_max_nnz if memory allows")
        cols.append(c)
        vals.append(hv)
        if progress is not None:
            progress(i1)
    return SparseCompatibility(
        crow=torch.cat(crows), col=torch.cat(cols), val=torch.cat(vals).float(),
        row_mean=row_mean.float(), col_mean=(col_sum / n).float(),
        kept_mass=float(kept / total.clamp_min(1e-30)))


def resample_by_compatibility(H: SparseCompatibility, n: int, generator: torch.Generator | None = None,
                              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n pairs (i, j): i uniform over the rows with a stored entry (or over ``rows``), then
    j with probability H_ij / sum_j' H_ij' within row i.  Empty rows are never drawn."""
    dev = H.crow.device
    nnz = H.row_nnz()
    if rows is None:
        rows = torch.nonzero(nnz > 0).flatten()
    else:
        rows = rows.to(dev)[nnz[rows.to(dev)] > 0]
    if len(rows) == 0:
        raise BenchError("the compatibility H has no entry above the threshold; lower h_threshold or "
                         "raise epsilon (stage I diverged or epsilon is far too small)")
    gen_dev = generator.device if generator is not None else dev
    pick = torch.randint(len(rows), (n,), generator=generator, device=gen_dev).to(dev)
    i = rows[pick]
    cum = H.cumulative
    start, end = H.crow[i], H.crow[i + 1]
    base = torch.where(start > 0, cum[(start - 1).clamp_min(0)], torch.zeros_like(cum[start]))
    row_total = cum[end - 1] - base
    r = torch.rand(n, generator=generator, device=gen_dev, dtype=torch.float64).to(dev)
    k = torch.searchsorted(cum, base + r * row_total, right=True)
    k = torch.minimum(torch.maximum(k, start), end - 1)
    return i, H.col[k]


# ---------------------------------------------------------------------------------------------
# exact plans (POT) and their extension to new source points
# ---------------------------------------------------------------------------------------------
def masked_cost(C: np.ndarray, mask: np.ndarray | None, eps: float) -> np.ndarray:
    """Replace the cost outside the mask by a value no dual pair can reach (so H = 0 there)."""
    if mask is None:
        return C
    C = np.array(C, dtype=np.float64, copy=True)
    allowed = mask > 0
    big = np.abs(C[allowed]).max() * 4 + 8.0 * eps * max(C.shape) + 1.0
    C[~allowed] = big
    return C


def exact_l2_plan(C, eps: float, mask=None, max_iter: int = 20000, tol: float = 1e-12):
    """Exact L2-regularised plan for uniform weights via POT.

    Returns (H, u, v): the density H = n m pi (so rows of H average to 1) and the dual potentials,
    which satisfy H = (u + v - C)_+ / (2 eps) with the mask applied.
    """
    import ot

    C = np.asarray(C, dtype=np.float64)
    n, m = C.shape
    Cm = masked_cost(C, None if mask is None else np.asarray(mask), eps)
    a = np.full(n, 1.0 / n)
    b = np.full(m, 1.0 / m)
    G, log = ot.smooth.smooth_ot_dual(a, b, Cm, reg=2.0 * eps * n * m, reg_type="l2",
                                      numItermax=max_iter, stopThr=tol, log=True)
    return np.asarray(G) * n * m, np.asarray(log["alpha"]), np.asarray(log["beta"])


def conditional_weights(xi_row: torch.Tensor, v: torch.Tensor, eps: float,
                        mask_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend a fitted dual (v on the m training targets) to a new source x.

    u(x) is the unique value with (1/m) sum_j I_j (u + v_j - xi(x, y_j))_+ / (2 eps) = 1, i.e. the
    dual optimality condition in u(x) (the x-marginal of pi is exact at x).  Found exactly by
    sorting (the left side is piecewise linear and increasing in u).  Returns (weights over the
    training targets summing to 1, i.e. pi(.|x), and u(x)).  Works row-wise on (B, m) inputs.
    """
    squeeze = xi_row.dim() == 1
    xi = xi_row.reshape(-1, xi_row.shape[-1]).double()
    a = (xi - v.double().reshape(1, -1))  # u must exceed a_j for y_j to be charged
    if mask_row is not None:
        a = torch.where(mask_row.reshape(a.shape) > 0, a, torch.full_like(a, float("inf")))
    m = a.shape[1]
    s, _ = torch.sort(a, dim=1)
    finite = torch.isfinite(s)
    s0 = torch.where(finite, s, torch.zeros_like(s))
    csum = torch.cumsum(s0, 1)
    k = torch.arange(1, m + 1, device=a.device, dtype=torch.float64)[None, :]
    # candidate u with the k smallest a's active: k u - csum_k = 2 eps m
    u_k = (2 * eps * m + csum) / k
    nxt = torch.cat([s[:, 1:], torch.full_like(s[:, :1], float("inf"))], 1)
    ok = finite & (u_k >= s) & (u_k <= nxt)
    idx = torch.argmax(ok.to(torch.int8), dim=1)
    u = u_k.gather(1, idx[:, None])
    w = torch.relu(u - a) / (2 * eps * m)
    w = w / w.sum(1, keepdim=True)
    u = u.flatten()
    return (w[0], u[0]) if squeeze else (w, u)


# ---------------------------------------------------------------------------------------------
# Wasserstein-2 helpers
# ---------------------------------------------------------------------------------------------
def w2_empirical(x, y, a=None, b=None) -> float:
    """W2 between weighted point clouds (uniform weights by default): quantiles in 1-D, ot.emd2 otherwise."""
    import ot

    x = np.asarray(torch.as_tensor(x).detach().double().cpu().reshape(len(x), -1))
    y = np.asarray(torch.as_tensor(y).detach().double().cpu().reshape(len(y), -1))
    a = np.full(len(x), 1.0 / len(x)) if a is None else np.asarray(torch.as_tensor(a).double().cpu())
    b = np.full(len(y), 1.0 / len(y)) if b is None else np.asarray(torch.as_tensor(b).double().cpu())
    a, b = a / a.sum(), b / b.sum()
    if x.shape[1] == 1:
        return float(math.sqrt(max(ot.wasserstein_1d(x[:, 0], y[:, 0], a, b, p=2), 0.0)))
    M = ot.dist(x, y, metric="sqeuclidean")
    return float(math.sqrt(max(ot.emd2(a, b, M, numItermax=1_000_000), 0.0)))


def forward_prior_w2(targets: torch.Tensor, weights: torch.Tensor, alpha_T: float, sigma_T: float) -> float:
    """Gaussian-part closed form of W2(p_T(.|x), N(0, I)) for a VP forward process.

    p_T(.|x) is the law of alpha_T y + sigma_T z with y ~ pi_hat(.|x) (the weighted ``targets``) and
    z ~ N(0, I).  Its mean is alpha_T mu and its covariance alpha_T^2 Sigma + sigma_T^2 I; the
    returned value is W2 between the Gaussian with these two moments and the prior (exact when
    pi_hat(.|x) is Gaussian).  Sigma's eigenvalues come from the weighted Gram matrix (rank <= #targets).
    """
    y = targets.reshape(len(targets), -1).double()
    w = weights.double().reshape(-1)
    w = w / w.sum()
    d = y.shape[1]
    mu = (w[:, None] * y).sum(0)
    yc = (y - mu) * w.sqrt()[:, None]
    gram = yc @ yc.T  # nonzero eigenvalues of Sigma = yc^T yc
    eigs = torch.linalg.eigvalsh(gram).clamp_min(0)
    lam = torch.full((d,), sigma_T ** 2, dtype=torch.float64)
    k = min(len(eigs), d)
    lam[:k] += alpha_T ** 2 * torch.sort(eigs, descending=True).values[:k]
    return float(math.sqrt(float((alpha_T * mu).pow(2).sum() + ((lam.sqrt() - 1) ** 2).sum())))
