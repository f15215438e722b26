#!/usr/bin/env python
"""How well can 10 guiding pairs steer a plan, in a given feature space? (issue 10, item 5)

On 2,000 random MNIST and 2,000 random Chinese-MNIST *training* images (seed 0), for each feature space:
  - NN-kp: share of images whose nearest keypoint (guiding-pair member of its own domain) has its class,
  - JS 1-NN / top50: OTCS's pure guidance cost xi = JS(relation vectors, tau = 0.1 x median keypoint cost);
    share of sources whose xi-nearest target (and 50 nearest) has the source's class.
Labels are read only to score; nothing here feeds a method. Inception features (the FID network, 2048-d) take
minutes per thousand images on this CPU; the run that printed results/digits/PROTOCOL.md's table took 24 min.

    BENCH_DATA=../shared/data python scripts/keypoint_features.py
"""
import time

import numpy as np
import torch
torch.set_num_threads(1)
from bench import ot
from bench.data import resolve_root
from bench.datasets.digits import DigitsTask
from bench.metrics.fid import fid_features
d = DigitsTask().load(resolve_root(None), 0, budget="cpu")
kx, ky = d.pairs
g = torch.Generator().manual_seed(0)
n = 2000
ix = torch.randperm(len(d.source_train), generator=g)[:n]; iy = torch.randperm(len(d.target_train), generator=g)[:n]
xs, ls = d.source_train[ix], d.source_train_labels[ix]
yt, lt = d.target_train[iy], d.target_train_labels[iy]
# keypoint labels: pairs are digit k <-> numeral k? find by nearest label via order
def evaluate(name, fx, fkx, fy, fky, cost, tau_rel=0.1):
    def rel(f, fk):
        c = ot.cost_matrix(f, fk, cost)
        tau = tau_rel * c.median()
        return torch.softmax(-c / tau, 1), c
    rx, cx = rel(fx, fkx); ry, cy = rel(fy, fky)
    acc_s = (cx.argmin(1) == ls).float().mean().item(); acc_t = (cy.argmin(1) == lt).float().mean().item()
    J = ot.js_matrix(rx, ry)
    nn1 = (lt[J.argmin(1)] == ls).float().mean().item()
    k = 50; top = J.topk(k, dim=1, largest=False).indices
    topk = (lt[top] == ls[:, None]).float().mean().item()
    print(f"{name:28s} NN-kp src {acc_s:.3f} tgt {acc_t:.3f} | JS 1-NN class match {nn1:.3f} top{k} {topk:.3f}", flush=True)
# labels of keypoints: assume pair k has class k; verify with classifier-free check
flat = lambda x: x.flatten(1)
pool = lambda x: torch.nn.functional.avg_pool2d(x, 2).flatten(1)
evaluate("pixels mse", flat(xs), flat(kx), flat(yt), flat(ky), "mean-squared")
evaluate("pool mse", pool(xs), pool(kx), pool(yt), pool(ky), "mean-squared")
evaluate("pixels cosine", flat(xs), flat(kx), flat(yt), flat(ky), "cosine")
blur = lambda x: torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x,(2,2,2,2),value=-1), 5, stride=1).flatten(1)
evaluate("blur5 mse", blur(xs), blur(kx), blur(yt), blur(ky), "mean-squared")
t = time.time()
F = lambda x: torch.as_tensor(np.asarray(fid_features(x, batch_size=100, data_root=resolve_root(None))))
fx, fkx, fy, fky = F(xs), F(kx), F(yt), F(ky)
print("inception secs", time.time() - t)
evaluate("inception cosine", fx, fkx, fy, fky, "cosine")
evaluate("inception mse", fx, fkx, fy, fky, "mean-squared")
