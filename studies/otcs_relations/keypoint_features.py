#!/usr/bin/env python
"""How well can 10 guiding pairs steer a plan? Feature spaces, tau and alpha (issue 10, item 5).

On 2,000 random MNIST and 2,000 random Chinese-MNIST *training* images (seed 0; guiding pairs of task seed 0):
  - NN-kp: share of images whose nearest keypoint (the guiding-pair member of its own domain) has its class,
  - xi 1-NN / top-50: OTCS's semi-paired cost xi = alpha c(x, y) + (1 - alpha) JS(R_x, R_y), relation vectors
    R = softmax(-c(., keypoints) / tau), tau = tau_rel x median keypoint cost (OTCS's rule); the share of sources
    whose xi-nearest target (and 50 nearest) has the source's class. As eps -> 0 the plan's rows concentrate on
    these neighbours, so top-50 is a label-free-to-compute proxy of OTCS's plan_acc, without training stage I.
Labels are read only to score; nothing here feeds a method. The training split only: no test image is used.
`--inception` adds the FID network's pool3 features (2048-d), as the authors use CLIP features on Animal: on
this CPU that took 24 min on one thread for the 4,020 images, beside another job.

`--contrastive STEPS` adds a label-free learned space: a small CNN trained with SimCLR's loss (bench/nn/contrastive.py),
its unit-norm 128-d representation as features; `--encoders` picks one encoder for both domains (as OTCS's
features=contrastive), one per domain, or both.

    BENCH_DATA=../shared/data python studies/otcs_relations/keypoint_features.py [--inception] [--contrastive 2000] \
        > studies/otcs_relations/keypoint_features.txt
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import ot
from bench.data import resolve_root
from bench.datasets.digits import DigitsTask


def xi_scores(xi, ls, lt, k=50):
    """Class agreement of the guiding cost xi (sources x targets): its 1-NN and its k nearest targets."""
    top = xi.topk(k, dim=1, largest=False).indices
    return {"xi_1nn": (lt[xi.argmin(1)] == ls).float().mean().item(),
            f"xi_top{k}": (lt[top] == ls[:, None]).float().mean().item()}


def scores(fx, fkx, fy, fky, ls, lt, cost="mean-squared", tau_rel=0.1, alpha=0.0, k=50):
    def rel(f, fk):
        c = ot.cost_matrix(f, fk, cost)
        return torch.softmax(-c / (tau_rel * c.median()), 1), c
    rx, cx = rel(fx, fkx)
    ry, cy = rel(fy, fky)
    xi = ot.js_matrix(rx, ry)
    if alpha:
        xi = alpha * ot.cost_matrix(fx, fy, cost) + (1 - alpha) * xi
    return {"nn_kp_src": (cx.argmin(1) == ls).float().mean().item(),
            "nn_kp_tgt": (cy.argmin(1) == lt).float().mean().item(), **xi_scores(xi, ls, lt, k)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--inception", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--contrastive", type=int, default=0, metavar="STEPS",
                   help="also a label-free learned space: a SimCLR encoder per domain (bench.nn.contrastive), "
                        "trained for STEPS steps on that domain's whole training split")
    p.add_argument("--encoders", choices=("both", "shared", "per-domain"), default="both",
                   help="contrastive: one encoder for both domains (what OTCS's features=contrastive fits), one per "
                        "domain, or both kinds")
    p.add_argument("--width", type=int, default=16, help="the contrastive encoder's width")
    p.add_argument("--batch", type=int, default=256,
                   help="the contrastive encoder's batch (images; two views each; 256 as OTCS's features=contrastive)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = resolve_root(None)
    d = DigitsTask().load(root, 0, budget="cpu")
    kx, ky = d.pairs
    g = torch.Generator().manual_seed(0)
    ix = torch.randperm(len(d.source_train), generator=g)[:a.n]
    iy = torch.randperm(len(d.target_train), generator=g)[:a.n]
    xs, ls = d.source_train[ix], d.source_train_labels[ix]
    yt, lt = d.target_train[iy], d.target_train_labels[iy]

    def show(name, feat, **kw):
        s = scores(feat(xs), feat(kx), feat(yt), feat(ky), ls, lt, **kw)
        print(f"{name:44s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in s.items()), flush=True)

    flat = lambda x: x.flatten(1)  # noqa: E731
    pool = lambda x: F.avg_pool2d(x, 2).flatten(1)  # noqa: E731  (OTCS's `pool` features)
    blur = lambda x: F.avg_pool2d(F.pad(x, (2, 2, 2, 2), value=-1), 5, stride=1).flatten(1)  # noqa: E731
    show("pixels, mean-squared", flat)
    show("pooled pixels, mean-squared (default)", pool)
    show("pixels, cosine", flat, cost="cosine")
    show("5x5-blurred pixels, mean-squared", blur)
    for tau in (0.02, 0.05, 0.2, 0.5, 1.0):
        show(f"pooled pixels, tau_rel {tau}", pool, tau_rel=tau)
    for alpha in (0.1, 0.5, 0.9):
        show(f"pooled pixels, alpha {alpha}", pool, alpha=alpha)
    if a.contrastive:
        from bench.nn.contrastive import embed, train_encoder
        feats = {}
        # keyed by storage: xs, kx, yt, ky are four distinct tensors that live to the end
        learned = lambda x: feats[(x.data_ptr(), len(x))]  # noqa: E731
    if a.contrastive and a.encoders != "shared":
        for name, domain, sets in (("MNIST", d.source_train, (xs, kx)), ("Chinese", d.target_train, (yt, ky))):
            t = time.time()
            enc = train_encoder(domain, steps=a.contrastive, batch=a.batch, width=a.width, seed=0,
                                log=lambda i, v, n=name: print(f"  {n} step {i} loss {v:.3f}", flush=True)
                                if i % 500 == 0 or i == a.contrastive - 1 else None)
            for s_ in sets:
                feats[(s_.data_ptr(), len(s_))] = embed(enc, s_)
            print(f"(contrastive encoder on {len(domain)} {name} training images: {time.time() - t:.0f} s)",
                  flush=True)
        show(f"contrastive per domain, {a.contrastive} steps, cosine", learned, cost="cosine")
        show(f"contrastive per domain, {a.contrastive} steps, mean-squared", learned)
        for tau in (0.02, 0.05, 0.2, 0.5):
            show(f"contrastive per domain, cosine, tau_rel {tau}", learned, cost="cosine", tau_rel=tau)
    if a.contrastive and a.encoders != "per-domain":
        # one encoder for both domains (OTCS's features=contrastive): the Chinese split and as many MNIST images
        t = time.time()
        both = torch.cat([d.source_train[torch.randperm(len(d.source_train), generator=g)[:len(d.target_train)]],
                          d.target_train])
        enc = train_encoder(both, steps=a.contrastive, batch=a.batch, width=a.width, seed=0,
                            log=lambda i, v: print(f"  shared step {i} loss {v:.3f}", flush=True)
                            if i % 500 == 0 or i == a.contrastive - 1 else None)
        for s_ in (xs, kx, yt, ky):
            feats[(s_.data_ptr(), len(s_))] = embed(enc, s_)
        print(f"(one contrastive encoder on {len(both)} images of both domains: {time.time() - t:.0f} s)", flush=True)
        show(f"contrastive shared, {a.contrastive} steps, cosine", learned, cost="cosine")
        show(f"contrastive shared, {a.contrastive} steps, mean-squared", learned)
        for tau in (0.02, 0.05, 0.2, 0.5):
            show(f"contrastive shared, mean-squared, tau_rel {tau}", learned, tau_rel=tau)
    if a.inception:
        from bench.metrics.fid import fid_features
        t = time.time()
        cache = {}

        def inception(x):
            key = (x.data_ptr(), len(x))
            if key not in cache:
                cache[key] = torch.as_tensor(np.asarray(fid_features(x, batch_size=100, data_root=root)))
            return cache[key]
        show("Inception pool3, cosine", inception, cost="cosine")
        print(f"(Inception features: {time.time() - t:.0f} s)")
        show("Inception pool3, mean-squared", inception)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
