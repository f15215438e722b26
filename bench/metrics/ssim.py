"""SSIM for images in [-1, 1], computed with torchmetrics' SSIM kernel.

Settings are those of Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, data range 2 (the width of [-1, 1]).  The score of an image is the mean of its SSIM
map over the *valid* region (pixels at least 5 from the border, whose window lies inside the
image), averaged over channels; this is what skimage's ``structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` returns.  torchmetrics'
``StructuralSimilarityIndexMeasure`` by default averages the full map, including border pixels
computed from reflect padding, which gives a different number (0.60 vs 0.67 on a 32x32 noise
test); so we ask torchmetrics for the full map and crop it ourselves.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

DATA_RANGE = 2.0  # images live in [-1, 1]
SIGMA = 1.5
PAD = int(3.5 * SIGMA + 0.5)  # half-width of the 11-tap Gaussian window that torchmetrics builds


def ssim_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair (N,) for [-1, 1] images (N, C, H, W), H and W > 10."""
    if preds.shape != target.shape or preds.dim() != 4:
        raise ValueError(f"SSIM needs equal (N,C,H,W) shapes, got {tuple(preds.shape)} and {tuple(target.shape)}")
    if min(preds.shape[-2:]) <= 2 * PAD:
        raise ValueError(f"SSIM needs images larger than {2 * PAD}x{2 * PAD}, got {tuple(preds.shape[-2:])}")
    p = preds.float().clamp(-1, 1)
    t = target.to(p.device).float().clamp(-1, 1)
    _, full = structural_similarity_index_measure(
        p, t, gaussian_kernel=True, sigma=SIGMA, data_range=DATA_RANGE, k1=0.01, k2=0.03,
        reduction="none", return_full_image=True)
    return full[..., PAD:-PAD, PAD:-PAD].mean(dim=(1, 2, 3))


class SSIM:
    """Streaming mean SSIM over image pairs: ``update(preds, target)``, ``compute() -> float``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.n = 0

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        s = ssim_per_image(preds, target)
        self.total += float(s.double().sum())
        self.n += len(s)

    def compute(self) -> float:
        if self.n == 0:
            raise ValueError("no image pairs were scored")
        return self.total / self.n


def ssim(preds: torch.Tensor, target: torch.Tensor, batch_size: int = 256) -> float:
    """Mean SSIM between two aligned stacks of [-1, 1] images (N, C, H, W)."""
    m = SSIM()
    for i in range(0, len(preds), batch_size):
        m.update(preds[i:i + batch_size], target[i:i + batch_size])
    return m.compute()
