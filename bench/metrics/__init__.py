"""Metrics, torchmetrics-style (``update`` / ``compute``), each tested against an independent reference.

- :mod:`.frechet`: Frechet distance between Gaussians and streaming feature statistics.
- :mod:`.fid`: clean-fid "clean"-mode FID of in-memory images (Inception 2015-12-05).
- :mod:`.classifier`: a small CNN judge: accuracy (``acc``) and its feature Frechet distance (``cfd``).
- :mod:`.ssim`: SSIM of [-1, 1] images (torchmetrics, Wang et al. 2004 settings).

Submodules import torch-heavy dependencies lazily; import what you need from them directly.
"""
from .frechet import FeatureStats, FrechetDistance, feature_stats, frechet_distance

__all__ = ["FeatureStats", "FrechetDistance", "feature_stats", "frechet_distance"]
