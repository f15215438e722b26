#!/usr/bin/env python
"""OTCS stage I on digits: the spread relation on the whole training splits, per feature map (issue 38).

For one feature map of the relation graph (``--map``) and each seed, with OTCS's own code (``prepare_ot``,
``plan_metrics``; ``cpu`` budget, so the OT sets are all 60,000 MNIST + 8,000 Chinese-MNIST training images
with the seed's 10 guiding pairs appended):
  - time of the map's features on both splits, of the kNN graphs, and of the rest of ``prepare_ot`` (the label
    spreading, the relation vectors of every training point); peak resident memory of the process;
  - per relation sharpening T (``--sharpen``): ``plan_acc_exact`` (% of the exact POT plan's mass of the guiding
    cost on ``--n`` class-balanced training images a side that joins same-class points) and ``rel_acc_src`` /
    ``rel_acc_tgt`` (% of those points whose largest relation is their own class's keypoint).
Labels are read only to score; nothing is chosen here on the test split (never loaded into a score).
One JSON line per (seed, T) is appended to ``--out``.

    python studies/otcs_stage1/stage1.py --map glyph-hog --seeds 0 --out studies/otcs_stage1/whole_splits.jsonl

``--subset-seed`` picks which class-balanced training subsets score the plan: the rows' own diagnostics use
``EXACT_PLAN_SEED`` (methods/otcs.py); the variant's settings were chosen on another draw (``--subset-seed 7``,
README.md: the validation rule).  ``--cold`` computes every cached piece afresh (a temporary cache).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--map", required=True, help="relation_features: pool | flatten | hog | glyph | glyph-hog | contrastive")
    p.add_argument("--seeds", default="0")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sharpen", default="1", help="comma-separated spread_sharpen values scored on one graph")
    p.add_argument("--n", type=int, default=2000, help="class-balanced training points a side for the exact plan")
    p.add_argument("--subset-seed", default=None,
                   help="comma-separated draws of the scored subsets; default: methods/otcs.py EXACT_PLAN_SEED")
    p.add_argument("--opt", action="append", default=[], help="another OTCS option KEY=VALUE (JSON value)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="a fresh temporary cache: every piece computed here")
    p.add_argument("--out", default="studies/otcs_stage1/whole_splits.jsonl")
    a = p.parse_args(argv)
    if a.cold:
        os.environ["BENCH_CACHE"] = tempfile.mkdtemp(prefix="otcs-stage1-")
    import torch
    from bench import features as fmaps
    from bench.data import resolve_root
    from bench.datasets.digits import DigitsTask
    from bench.methods.otcs import EXACT_PLAN_SEED, OTCS
    from bench.context import FitContext
    torch.set_num_threads(a.threads)
    extra = {}
    for item in a.opt:
        k, v = item.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    subset_seeds = [EXACT_PLAN_SEED] if a.subset_seed is None else [int(v) for v in a.subset_seed.split(",")]
    task = DigitsTask()
    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.perf_counter()
        data = task.load(resolve_root(None), seed, budget="cpu")
        rss_data = rss_mib()
        opts = {"relations": "spread", "relation_features": a.map, "spread_k": a.k, **extra}
        m = OTCS(budget="cpu", **opts)
        run = FitContext(None, device="cpu", seed=seed, budget="cpu", progress=False)
        run.method = m
        torch.manual_seed(seed)
        m.setup(data, run)
        xs, yt, sk, tk = m._ot_sets(data, run.seed)
        feats_cached = a.map in fmaps.CACHED and all(
            fmaps.cache_path(a.map, b.float()).is_file() for b in (xs, yt)) if a.map != "contrastive" else False
        t, c = time.perf_counter(), time.process_time()
        if a.map == "contrastive":
            m.fit_features(xs, yt, run)
        gx, gy = m.features(xs, "relation"), m.features(yt, "relation")
        features_s, features_cpu = time.perf_counter() - t, time.process_time() - c
        knn_cached = all(fmaps.cache_path("knn", g, extra=f",k={a.k}").is_file()
                         for g in (gx[: len(gx) - len(sk)], gy[: len(gy) - len(tk)]))
        t, c = time.perf_counter(), time.process_time()
        fmaps.knn(gx[: len(gx) - len(sk)], a.k)
        fmaps.knn(gy[: len(gy) - len(tk)], a.k)
        knn_s, knn_cpu = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        m.prepare_ot(data, run)  # features and kNN graphs now come from the cache: the spreading and relations
        spread_s, spread_cpu = time.perf_counter() - t, time.process_time() - c
        peak = rss_mib()
        for T, subset_seed in [(float(v), ss) for v in a.sharpen.split(",") for ss in subset_seeds]:
            m.options["spread_sharpen"] = T
            t = time.perf_counter()
            diag = m.plan_metrics(data, n=a.n, seed=subset_seed)
            row = {"map": a.map, "seed": seed, "k": a.k, "sharpen": T, "opts": extra, "n": a.n,
                   "subset_seed": subset_seed, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in diag.items()},
                   "features_s": round(features_s, 1), "knn_s": round(knn_s, 1), "spread_s": round(spread_s, 1),
                   "exact_s": round(time.perf_counter() - t, 1), "features_cpu_s": round(features_cpu, 1),
                   "knn_cpu_s": round(knn_cpu, 1), "spread_cpu_s": round(spread_cpu, 1), "rss_after_data_mib": round(rss_data),
                   "peak_rss_mib": round(max(peak, rss_mib())), "features_cached": feats_cached,
                   "knn_cached": knn_cached, "cold_cache": a.cold, "threads": a.threads,
                   "ot_n": m.extra_state["ot_n"], "ot_m": m.extra_state["ot_m"],
                   "cpu": platform.processor() or platform.machine(), "total_s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            out = Path(a.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
