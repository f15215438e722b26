"""Frechet distance between Gaussians, and a feature-statistics accumulator.

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)

The trace term is computed from the symmetric PSD matrix S1^1/2 S2 S1^1/2 with symmetric
eigendecompositions (float64), so there is no complex ``sqrtm`` of the non-symmetric product
S1 S2 and no imaginary part to discard; tiny negative eigenvalues from round-off are clipped.
The eigenvalues of S1^1/2 S2 S1^1/2 equal those of S1 S2, so the value is the usual FID formula
(and the squared Bures-Wasserstein distance between the two Gaussians).
"""
from __future__ import annotations

import numpy as np
import torch


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (rows are samples), as clean-fid computes them."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need a (N>=2, D) feature array, got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


class FeatureStats:
    """Streaming mean/covariance of feature rows (float64 sums), torchmetrics-style ``update``.

    Accumulates sum(x) and sum(x x^T); ``compute`` returns (mu, unbiased sigma) as numpy arrays.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self._sum = None
        self._outer = None

    def update(self, feats) -> None:
        f = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats)
        f = f.detach().to("cpu", torch.float64).reshape(len(f), -1)
        if self._sum is None:
            self._sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self._outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self._sum += f.sum(0)
        self._outer += f.T @ f
        self.n += len(f)

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("need at least 2 samples for a covariance")
        mu = self._sum / self.n
        sigma = (self._outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


class FrechetDistance:
    """Frechet distance of streamed features against fixed reference statistics (or a second stream).

    ``update(feats, real=False)`` adds generated features; ``update(feats, real=True)`` adds
    reference features unless reference statistics were given to the constructor.
    """

    def __init__(self, ref_mu=None, ref_sigma=None) -> None:
        self.fake = FeatureStats()
        self.real = FeatureStats()
        self.ref = None if ref_mu is None else (np.asarray(ref_mu), np.asarray(ref_sigma))

    def reset(self) -> None:
        self.fake.reset()
        self.real.reset()

    def update(self, feats, real: bool = False) -> None:
        (self.real if real else self.fake).update(feats)

    def compute(self) -> float:
        mu1, s1 = self.fake.compute()
        mu2, s2 = self.ref if self.ref is not None else self.real.compute()
        return frechet_distance(mu1, s1, mu2, s2)
