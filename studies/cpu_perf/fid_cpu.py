"""FID's Inception on the CPU: images/s of the pool3 features in both memory layouts, and how far they differ.

    python studies/cpu_perf/fid_cpu.py [THREADS] [N] [BATCH]

Resizes N random digit-sized images (default 128) with clean-fid's "clean" resizer once, then times the
network alone (one warm-up batch, then N images in batches of BATCH, default 64) in the contiguous (NCHW) layout and in the
channels-last layout that bench.metrics.fid uses on the CPU. Prints images/s for each, the speed-up, and the
largest absolute difference between the two layouts' features and between the FIDs they give against
each other's reference statistics. Nothing here is a test.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from bench.data import cache_dir, resolve_root
from bench.metrics.fid import _InceptionFeatures, clean_resize, load_inception, to_uint8
from bench.metrics.frechet import feature_stats, frechet_distance


def features(net, batches) -> tuple[np.ndarray, float]:
    with torch.no_grad():
        net(batches[0][:8])
        t0 = time.perf_counter()
        out = np.concatenate([net(b).double().numpy() for b in batches])
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    threads = int(argv[0]) if argv else torch.get_num_threads()
    n = int(argv[1]) if len(argv) > 1 else 128
    bs = int(argv[2]) if len(argv) > 2 else 64
    torch.set_num_threads(threads)
    loaded, sha = load_inception("cpu", resolve_root(None), cache_dir())
    layers = loaded.layers
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    batches = [clean_resize(to_uint8(imgs[i:i + bs])) for i in range(0, n, bs)]
    plain, t_plain = features(_InceptionFeatures(layers.to(memory_format=torch.contiguous_format)).eval(), batches)
    cl, t_cl = features(_InceptionFeatures(layers, channels_last=True).eval(), batches)
    print(f"Inception pool3 features, {n} images in batches of {bs}, {threads} thread(s), network {sha[:12]}")
    print(f"  contiguous (NCHW): {n / t_plain:6.2f} images/s")
    print(f"  channels-last:     {n / t_cl:6.2f} images/s  ({t_plain / t_cl:.2f}x)")
    print(f"  max |feature difference| {np.abs(plain - cl).max():.2e} (features up to {np.abs(plain).max():.2f})")
    half = n // 2
    fid_a = frechet_distance(*feature_stats(plain[:half]), *feature_stats(plain[half:]))
    fid_b = frechet_distance(*feature_stats(cl[:half]), *feature_stats(cl[half:]))
    print(f"  FID between the two halves: {fid_a:.6f} (NCHW) vs {fid_b:.6f} (channels-last)")


if __name__ == "__main__":
    main()
