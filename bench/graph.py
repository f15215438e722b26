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


def spread(feats: torch.Tensor, seeds: torch.Tensor, k: int = 10, alpha: float = 0.99,
           iters: int = 400) -> torch.Tensor:
    """Label spreading of the indicators of ``seeds`` (indices into ``feats``, one column each) over the
    symmetric kNN graph of ``feats`` with Gaussian weights (bandwidth: the median k-th neighbour distance).

    Returns F (N, len(seeds)), rows not normalised; iterates F <- a S F + (1 - a) Y ``iters`` times."""
    n = len(feats)
    d, j = knn(feats, feats, k, exclude_self=True)
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
    Y = torch.zeros(n, len(seeds), dtype=feats.dtype, device=feats.device)
    Y[seeds, torch.arange(len(seeds), device=feats.device)] = 1.0
    F = Y.clone()
    for _ in range(iters):
        F = alpha * torch.sparse.mm(S, F) + (1 - alpha) * Y
    return F


def relations(F: torch.Tensor, graph_feats: torch.Tensor, x: torch.Tensor, k: int = 10,
              eps: float = 1e-12) -> torch.Tensor:
    """Relation vectors (N, K) of points ``x``: the mean spread indicator of their k nearest graph points,
    each normalised to sum 1 (scale-free: far points carry tiny F)."""
    Fn = F / F.sum(1, keepdim=True).clamp_min(eps)
    _, j = knn(x, graph_feats, k)
    R = Fn[j].mean(1)
    return R / R.sum(1, keepdim=True).clamp_min(eps)
