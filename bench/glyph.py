"""Glyph normalisation: a greyscale glyph brought to MNIST's look, the way MNIST itself was built.

Contrast stretched to the glyph's own ink level, cropped to the ink's bounding box, strokes thickened to
``MNIST_STROKE_WIDTH`` (the median stroke width of MNIST test digits, ink area over skeleton length), the glyph
fitted into 20 x 20 px and pasted so that its centre of mass sits at the centre of 28 x 28 (LeCun et al.'s
recipe).  The digits task prepares Chinese-MNIST with it (``mnist-style``), and OTCS's stage I can see any
image through it (:mod:`bench.features`, ``glyph``)."""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

MNIST_STROKE_WIDTH = 2.6


def _stroke_width(mask: np.ndarray) -> float:
    length = int(skeletonize(mask).sum())
    return float(mask.sum()) / max(length, 1)


def mnistify(img: np.ndarray, stroke_width: float = MNIST_STROKE_WIDTH) -> np.ndarray:
    """One uint8 greyscale glyph (e.g. a 64x64 Chinese-MNIST image) -> 28x28 float32 in [0, 1], MNIST-style."""
    x = img.astype(np.float32)
    peak = x.max()
    if peak <= 0:
        return np.zeros((28, 28), np.float32)
    core = float(np.percentile(x[x > 0.25 * peak], 90))
    x = np.clip((x - 0.15 * core) / (0.85 * core), 0.0, 1.0)
    mask = x > 0.3
    if not mask.any():
        return np.zeros((28, 28), np.float32)
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    x, mask = x[box], mask[box]
    s = 20.0 / max(x.shape)
    k = int(max(1, round(stroke_width / s - _stroke_width(mask) + 1)))
    if k > 1:
        x = ndimage.grey_dilation(np.pad(x, k), footprint=np.ones((k, k), bool))
        ys, xs = np.nonzero(x > 0)
        x = x[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        s = 20.0 / max(x.shape)
    h, w = max(1, round(x.shape[0] * s)), max(1, round(x.shape[1] * s))
    y = np.clip(np.asarray(Image.fromarray(x, mode="F").resize((w, h), Image.BOX)), 0.0, 1.0)
    cy, cx = ndimage.center_of_mass(y)
    oy = min(max(int(round(13.5 - cy)), 0), 28 - h)
    ox = min(max(int(round(13.5 - cx)), 0), 28 - w)
    out = np.zeros((28, 28), np.float32)
    out[oy:oy + h, ox:ox + w] = y
    return out
