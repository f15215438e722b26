#!/usr/bin/env python
"""Relation vectors spread along each domain's data (bench/graph.py) vs OTCS's distance-to-keypoint ones.

Same proxy as keypoint_features.py (beside this file) (issue 10, item 5): on 2,000 random MNIST and 2,000 random
Chinese-MNIST *training* images (seed 0; guiding pairs of task seed 0):
  - kp-acc: share of images whose strongest relation (argmax_k R_x) is the keypoint of its own class,
  - xi 1-NN / top-50: share of sources whose JS-nearest target (50 nearest) has the source's class.
The graph of each domain is built on its whole training split (60,010 MNIST, 8,010 Chinese-MNIST images incl.
the keypoints) in pooled 14x14 pixels (OTCS's default features). Labels are read only to score.

    BENCH_DATA=../shared/data python studies/otcs_relations/keypoint_spreading.py > studies/otcs_relations/keypoint_spreading.txt
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench import graph, ot
from bench.data import resolve_root
from bench.datasets.digits import DigitsTask
from keypoint_features import xi_scores  # this folder is on sys.path when run as a script


def score(rx, ry, ls, lt, k=50):
    return {"kp_src": (rx.argmax(1) == ls).float().mean().item(), "kp_tgt": (ry.argmax(1) == lt).float().mean().item(),
            **xi_scores(ot.js_matrix(rx, ry), ls, lt, k)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, action="append", default=None, help="graph neighbours (repeatable)")
    p.add_argument("--alpha", type=float, action="append", default=None, help="spreading alpha (repeatable)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    d = DigitsTask().load(resolve_root(None), 0, budget="cpu")
    pi = d.extra["pair_indices"]
    g = torch.Generator().manual_seed(0)
    ix = torch.randperm(len(d.source_train), generator=g)[:a.n]
    iy = torch.randperm(len(d.target_train), generator=g)[:a.n]
    ls, lt = d.source_train_labels[ix], d.target_train_labels[iy]
    pool = lambda x: F.avg_pool2d(x, 2).flatten(1)  # noqa: E731
    fs, ft = pool(d.source_train), pool(d.target_train)
    ks, kt = torch.as_tensor(pi["source"]), torch.as_tensor(pi["target"])
    print("keypoint classes: source", d.source_train_labels[ks].tolist(), "target", d.target_train_labels[kt].tolist())

    def show(name, rx, ry):
        s = score(rx, ry, ls, lt)
        print(f"{name:46s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in s.items()), flush=True)

    med_x, med_y = ot.cost_matrix(fs[ix], fs[ks]).median(), ot.cost_matrix(ft[iy], ft[kt]).median()
    for tau in (0.1, 0.02):
        show(f"distance to keypoints, tau_rel {tau} (OTCS)", ot.relation_vectors(fs[ix], fs[ks], tau=tau * med_x),
             ot.relation_vectors(ft[iy], ft[kt], tau=tau * med_y))
    for k in a.k or [10]:
        for alpha in a.alpha or [0.99]:
            t = time.time()
            Fs = graph.spread(fs, ks, k=k, alpha=alpha)
            Ft = graph.spread(ft, kt, k=k, alpha=alpha)
            rx, ry = graph.relations(Fs, fs, fs[ix], k=k), graph.relations(Ft, ft, ft[iy], k=k)
            full_s = (Fs.argmax(1) == d.source_train_labels).float().mean().item()
            full_t = (Ft.argmax(1) == d.target_train_labels).float().mean().item()
            show(f"spread k={k} alpha={alpha}", rx, ry)
            for temp in (0.5, 0.25):
                sh = lambda r: (r.clamp_min(1e-12) ** (1 / temp)) / (r.clamp_min(1e-12) ** (1 / temp)).sum(1, keepdim=True)  # noqa: E731
                show(f"spread k={k} alpha={alpha} sharpened T={temp}", sh(rx), sh(ry))
            print(f"  (whole splits: argmax F right for {100 * full_s:.1f} % of MNIST, {100 * full_t:.1f} % of "
                  f"Chinese; {time.time() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
