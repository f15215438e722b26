"""Feature maps for OTCS's stage I, as named pieces whose values are cached by content hash.

Stage I of OTCS sees its images through a fixed feature map in three roles: the inputs of the potentials u(x),
v(y), the relation graph / relation vectors to the keypoints, and the plain cost c(x, y) (methods/otcs.py lets each
role name its own map).  Every map here is label-free and acts on one image at a time (the contrastive encoder is
fitted without labels, on both domains' training images), so a map can never leak a class into the plan.

``flatten``    the pixels, (C H W)-d.
``pool``       2x2 average-pooled pixels (OTCS's default on digits), (C H/2 W/2)-d.
``hog``        histograms of oriented gradients (Dalal & Triggs 2005; ``skimage.feature.hog``): 9 orientations,
               a 4 x 4 grid of cells (7 x 7 px on 28 x 28), 2 x 2-cell blocks, L2-Hys: 324-d.
``glyph``      the glyph-normalised image (below), 28 x 28 pixels in [-1, 1]: 784-d.
``glyph-hog``  HOG of the glyph-normalised image: 324-d.
``contrastive`` a SimCLR encoder's unit-norm representation (bench/nn/contrastive.py); needs the fitted encoder.

Glyph normalisation (``glyph_images``) is the recipe of the digits task's ``mnist-style`` preparation
(bench.glyph.mnistify: MNIST's own construction plus an intensity and a stroke-width step) applied to
each image the method is given: contrast stretched to the image's own ink level, cropped to the ink's bounding box,
strokes brought to ~2.6 px (MNIST's median width), the glyph fitted into 20 x 20 and pasted so that its centre of
mass sits at the centre of 28 x 28.  The task's images are not changed; only what stage I sees.  Multi-channel
images are normalised on their channel mean.  Under the paper's plain resize of Chinese-MNIST it is what lets a
numeral's graph follow its class (../shared/research/stage1.md: spread relation, exact plan 25-40 % -> 65-71 %).

Caching: maps that cost more than a pass over the pixels (``CACHED``) are stored under
``<cache>/features/<name>_<n>_<sha>.pt``, ``sha`` the sha256 of the map's name and version, the images' bytes (and
the encoder's weights for ``contrastive``), so a changed input or recipe never reads a stale entry; inputs of
fewer than ``CACHE_MIN`` images are computed directly.  ``glyph-hog`` reads ``glyph``'s entry, so the whole
training splits are glyph-normalised once for both maps.  ``knn`` caches the k-nearest-neighbour graph of a
feature set the same way (the spread relation's graph on a whole training split: the same for every seed).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import graph, store
from .data import cache_dir as default_cache
from .errors import BenchError
from .glyph import mnistify
from .locks import cache_entry_lock
from .nn.contrastive import embed

MAPS = ("flatten", "pool", "hog", "glyph", "glyph-hog", "contrastive")
# bumped when a map's recipe changes: part of every cache key
VERSIONS = {"flatten": 1, "pool": 1, "hog": 1, "glyph": 1, "glyph-hog": 1, "contrastive": 1, "knn": 1}
CACHED = ("hog", "glyph", "glyph-hog", "contrastive")
CACHE_MIN = 2048
HOG_DIM = 324  # 9 orientations x (3 x 3 blocks of 2 x 2 cells)
GLYPH_SIDE = 28


def check(name: str) -> str:
    if name not in MAPS:
        raise BenchError(f"unknown feature map {name!r}; choose one of {', '.join(MAPS)}")
    return name


def dim(name: str, shape: tuple[int, ...], encoder_dim: int = 128) -> int:
    """Size of ``name``'s features for images of ``shape`` (C, H, W)."""
    c, h, w = shape
    return {"flatten": c * h * w, "pool": c * (h // 2) * (w // 2), "hog": HOG_DIM, "glyph": GLYPH_SIDE ** 2,
            "glyph-hog": HOG_DIM, "contrastive": encoder_dim}[check(name)]


# -- the maps -----------------------------------------------------------------------------------------------------
def _grey01(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W) float32 numpy in [0, 1] (channel mean)."""
    return ((x.detach().float().cpu().mean(1) + 1.0) / 2.0).clamp(0, 1).numpy()


def glyph_images(x: torch.Tensor) -> torch.Tensor:
    """Glyph-normalised images (N, 1, 28, 28) in [-1, 1] of images (N, C, H, W) in [-1, 1] (module doc)."""
    imgs = _grey01(x) * 255.0
    out = np.stack([mnistify(im) for im in imgs]) if len(imgs) else np.zeros((0, GLYPH_SIDE, GLYPH_SIDE), np.float32)
    return torch.from_numpy(out * 2.0 - 1.0).float().unsqueeze(1)


def hog_features(x: torch.Tensor) -> torch.Tensor:
    """HOG (module doc) of images (N, C, H, W) in [-1, 1] (H, W >= 8): (N, 324)."""
    from skimage.feature import hog
    _, _, h, w = x.shape
    if h < 8 or w < 8:
        raise BenchError(f"HOG features need images of at least 8 x 8 pixels, got {h} x {w}")
    cell = (h // 4, w // 4)
    imgs = _grey01(x)
    out = [hog(im, orientations=9, pixels_per_cell=cell, cells_per_block=(2, 2), block_norm="L2-Hys",
               feature_vector=True) for im in imgs]
    return torch.from_numpy(np.stack(out).astype(np.float32)) if out else torch.zeros(0, HOG_DIM)


def _compute(name: str, x: torch.Tensor, encoder, cache: bool, cache_dir=None) -> torch.Tensor:
    if name == "flatten":
        return x.float().flatten(1)
    if name == "pool":
        return F.avg_pool2d(x.float(), 2).flatten(1)
    if name == "hog":
        return hog_features(x)
    if name == "glyph":
        return glyph_images(x).flatten(1)
    if name == "glyph-hog":
        g = compute("glyph", x, cache=cache, cache_dir=cache_dir)
        return hog_features(g.reshape(len(g), 1, GLYPH_SIDE, GLYPH_SIDE))
    if name == "contrastive":
        if encoder is None:
            raise BenchError("feature map 'contrastive' needs its fitted encoder")
        return embed(encoder, x.float())
    raise AssertionError(name)


# -- the cache ----------------------------------------------------------------------------------------------------
def content_key(name: str, x: torch.Tensor, encoder=None, extra: str = "") -> str:
    """sha256 of what determines ``name``'s value on ``x``: the piece, its version, the tensor (and weights)."""
    h = hashlib.sha256(f"{name}:v{VERSIONS[name]}:{extra}:{tuple(x.shape)}:{x.dtype}:".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    if encoder is not None:
        for k, v in sorted(encoder.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(name: str, x: torch.Tensor, encoder=None, cache_dir: Path | str | None = None,
               extra: str = "") -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache()
    tag = f"{name}{extra}".replace("=", "").replace(",", "_")
    return root / "features" / f"{tag}_{len(x)}_{content_key(name, x, encoder, extra)[:24]}.pt"


def _cached(path: Path, build):
    """The tensor(s) stored at ``path``, else ``build()`` stored there (atomically, under the entry's lock)."""
    with cache_entry_lock(path):  # one process computes an entry; concurrent ones wait, then load it
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                path.unlink(missing_ok=True)
        out = build()
        store.torch_save(path, out)
        return out


def compute(name: str, x: torch.Tensor, encoder=None, cache: bool = True,
            cache_dir: Path | str | None = None) -> torch.Tensor:
    """``name``'s features (N, d) float32 of images ``x`` (N, C, H, W) in [-1, 1], on ``x``'s device.

    Cached by content (module doc) when the map is in ``CACHED``, ``cache`` is on and there are at least
    ``CACHE_MIN`` images; an unreadable entry is rebuilt."""
    check(name)
    if x.dim() != 4:
        raise BenchError(f"feature map {name!r} takes images (N, C, H, W), got shape {tuple(x.shape)}")
    dev = x.device
    if not (cache and name in CACHED and len(x) >= CACHE_MIN):
        return _compute(name, x, encoder, cache, cache_dir).to(dev)
    x_in = x if name == "contrastive" else x.cpu()
    out = _cached(cache_path(name, x.float(), encoder, cache_dir),
                  lambda: _compute(name, x_in, encoder, cache, cache_dir).float().cpu().contiguous())
    return out.to(dev)


def knn(feats: torch.Tensor, k: int, cache: bool = True, cache_dir: Path | str | None = None):
    """``bench.graph.knn(feats, feats, k, exclude_self=True)`` (squared distances, indices), cached by content for
    ``CACHE_MIN`` points or more: the spread relation's graph on a whole training split is the same for every
    seed (the seed's keypoints are appended by ``bench.graph.knn_extended``)."""
    if not (cache and len(feats) >= CACHE_MIN):
        return graph.knn(feats, feats, k, exclude_self=True)
    dev = feats.device
    d, j = _cached(cache_path("knn", feats, cache_dir=cache_dir, extra=f",k={int(k)}"),
                   lambda: tuple(t.cpu().contiguous() for t in graph.knn(feats, feats, k, exclude_self=True)))
    return d.to(dev), j.to(dev)
