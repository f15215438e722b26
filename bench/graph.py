"""Keypoint relations through a domain's own data: a k-nearest-neighbour graph and label spreading.

OTCS relates every point to the K guiding keypoints of its domain by R_x = softmax_k(-c(x, x_k) / tau), a
distance in feature space.  With one keypoint per class that is a one-exemplar nearest-neighbour rule, which on
pixels is right for only ~40 % of MNIST digits.  Here the relation is spread along the data instead (Zhou et al.,
"Learning with local and global consistency", NIPS 2003): each keypoint's indicator diffuses over the domain's
symmetric kNN graph, F = (1 - a) (I - a S)^-1 Y with S = D^-1/2 W D^-1/2, so a point relates to the keypoint it
is connected to through many similar points, not merely the closest one.  No label is read: the keypoints are
the guiding pairs the task gives.  A point outside the graph (a test source) takes the mean relation of its k
nearest graph points, as every graph point does, so training and test points are treated alike.
"""
from __future__ import annotations

import warnings

import torch


def knn(query: torch.Tensor, base: torch.Tensor, k: int, chunk: int = 2048,
        exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distances, indices) of the k nearest rows of ``base`` for each row of ``query``, (N, k) each
    (k capped at the number of candidates).

    ``exclude_self``: query is base, drop each point's own entry."""
    bn = (base * base).sum(1)
    dists, idx = [], []
    extra = 1 if exclude_self else 0
    k = min(k, len(base) - extra)  # a set smaller than k + 1: everyone is a neighbour
    for i in range(0, len(query), chunk):
        q = query[i:i + chunk]
        d = (q * q).sum(1, keepdim=True) + bn[None, :] - 2 * q @ base.T
        if exclude_self:
            r = torch.arange(len(q), device=q.device)
            d[r, r + i] = float("inf")
        v, j = d.topk(k + extra, dim=1, largest=False)
        dists.append(v[:, :k].clamp_min(0))
        idx.append(j[:, :k])
    return torch.cat(dists), torch.cat(idx)


def knn_extended(base: torch.Tensor, extra: torch.Tensor, k: int,
                 base_knn: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``knn(all, all, k, exclude_self=True)`` of ``all = cat([base, extra])`` from ``base``'s own kNN
    (``base_knn``, e.g. cached: it does not change when a few points are appended).  Exact up to the order of
    ties: a base point's k nearest in the union are among its k nearest in ``base`` and the ``extra`` points."""
    nb, ne = len(base), len(extra)
    if base_knn is None:
        base_knn = knn(base, base, k, exclude_self=True)
    d0, j0 = base_knn
    k = min(k, nb + ne - 1)
    if ne == 0:
        return d0[:, :k], j0[:, :k]
    de = ((base * base).sum(1, keepdim=True) + (extra * extra).sum(1)[None, :] - 2 * base @ extra.T).clamp_min(0)
    cand_d = torch.cat([d0, de], 1)
    cand_j = torch.cat([j0, torch.arange(nb, nb + ne, device=base.device).expand(nb, ne)], 1)
    v, p = cand_d.topk(k, dim=1, largest=False)
    every = torch.cat([base, extra])
    dx = ((extra * extra).sum(1, keepdim=True) + (every * every).sum(1)[None, :] - 2 * extra @ every.T)
    dx[torch.arange(ne, device=base.device), nb + torch.arange(ne, device=base.device)] = float("inf")
    vx, jx = dx.topk(k, dim=1, largest=False)
    return torch.cat([v, vx.clamp_min(0)]), torch.cat([cand_j.gather(1, p), jx])


def spread(feats: torch.Tensor, seeds: torch.Tensor, k: int = 10, alpha: float = 0.99,
           iters: int = 400, neighbours: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Label spreading of the indicators of ``seeds`` (indices into ``feats``, one column each) over the
    symmetric kNN graph of ``feats`` with Gaussian weights (bandwidth: the median k-th neighbour distance).

    ``neighbours``: ``knn(feats, feats, k, exclude_self=True)`` if already known (``knn_extended``).
    Returns F (N, len(seeds)), rows not normalised; iterates F <- a S F + (1 - a) Y ``iters`` times."""
    n = len(feats)
    d, j = knn(feats, feats, k, exclude_self=True) if neighbours is None else neighbours
    k = j.shape[1]
    sigma2 = d[:, -1].median().clamp_min(1e-12)
    w = torch.exp(-d / sigma2)
    rows = torch.arange(n, device=feats.device).repeat_interleave(k)
    W = torch.sparse_coo_tensor(torch.stack([rows, j.flatten()]), w.flatten(), (n, n), check_invariants=False)
    W = (W + W.t()).coalesce()  # symmetric: an edge if either end lists the other
    deg = torch.sparse.sum(W, 1).to_dense().clamp_min(1e-12)
    r = deg.rsqrt()
    ii, jj = W.indices()
    S = torch.sparse_coo_tensor(W.indices(), W.values() * r[ii] * r[jj], (n, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # CSR: the same products as COO, ~2.5x faster on the CPU
        warnings.simplefilter("ignore", UserWarning)
        S = S.to_sparse_csr()
    Y = torch.zeros(n, len(seeds), dtype=feats.dtype, device=feats.device)
    Y[seeds, torch.arange(len(seeds), device=feats.device)] = 1.0
    F = Y.clone()
    for _ in range(iters):
        F = alpha * (S @ F) + (1 - alpha) * Y
    return F


def relations(F: torch.Tensor, graph_feats: torch.Tensor, x: torch.Tensor, k: int = 10,
              eps: float = 1e-12, neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """Relation vectors (N, K) of points ``x``: the mean spread indicator of their k nearest graph points,
    each normalised to sum 1 (scale-free: far points carry tiny F).  ``neighbours``: those indices (N, k) if
    already known (for the graph's own points: each point itself and its k - 1 nearest others)."""
    Fn = F / F.sum(1, keepdim=True).clamp_min(eps)
    j = knn(x, graph_feats, k)[1] if neighbours is None else neighbours
    R = Fn[j].mean(1)
    return R / R.sum(1, keepdim=True).clamp_min(eps)
