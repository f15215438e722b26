#!/usr/bin/env python
"""OTCS stage I learned, briefly: how close the potentials' plan comes to the exact plan of the same cost.

Runs OTCS's own ``prepare_ot`` and ``fit_potentials`` (``cpu`` budget, whole training splits) for ``--steps``
potential steps, then scores the learned plan pi_hat(.|x) (``conditional_plan``) on class-balanced MNIST *training*
sources (``--n``, drawn by ``--subset-seed``; labels read only to score) against the 8,000 Chinese-MNIST training
targets: ``plan_acc_train``, the same quantity as the rows' ``plan_acc`` on training instead of test sources.
One JSON line per run is appended to ``--out``.

    python studies/otcs_stage1/learned.py --opt relations=spread --opt relation_features=glyph-hog \
        --opt potential_input=relations --steps 4000 --out studies/otcs_stage1/learned.jsonl
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opt", action="append", default=[], help="OTCS option KEY=VALUE (JSON value)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--subset-seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--marginals", action="store_true",
                   help="also the marginal violations E_x|E_y H - 1|, E_y|E_x H - 1| over every training pair "
                        "(< 0.1: converged, results/digits/PROTOCOL.md's rule for eps)")
    p.add_argument("--out", default="studies/otcs_stage1/learned.jsonl")
    a = p.parse_args(argv)
    import torch
    from bench.data import resolve_root
    from bench.datasets.digits import DigitsTask, plan_accuracy
    from bench.methods.otcs import OTCS, balanced_subset
    from bench.context import FitContext
    torch.set_num_threads(a.threads)
    opts = {}
    for item in a.opt:
        k, v = item.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    data = DigitsTask().load(resolve_root(None), a.seed, budget="cpu")
    m = OTCS(budget="cpu", **{**opts, "ot_steps": a.steps})
    run = FitContext(None, device="cpu", seed=a.seed, budget="cpu", progress=False)
    run.method = m
    torch.manual_seed(a.seed)
    m.setup(data, run)
    t0, c0 = time.perf_counter(), time.process_time()
    m.prepare_ot(data, run)
    prep_s, prep_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    m.fit_potentials(run)
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    i = balanced_subset(data.source_train_labels, a.n, a.subset_seed)
    pa = plan_accuracy(m, data.source_train[i], data.source_train_labels[i], data.target_train,
                       data.target_train_labels, "cpu")
    diag = m.plan_metrics(data, n=a.n, seed=a.subset_seed)
    if a.marginals:
        from bench import ot
        P = m._prob
        us, vs = m.potentials()
        cols = torch.arange(P.m)
        full = ot.sparse_compatibility(us, vs, lambda i0, i1: P.xi_block(torch.arange(i0, i1), cols), P.eps_n,
                                       threshold=0.1, block_rows=256)
        mx, my = full.marginal_violation()
        diag.update(marginal_x=round(mx, 4), marginal_y=round(my, 4),
                    h_nnz_per_row=round(len(full.col) / P.n, 1), empty_rows=int(len(full.empty_rows())))
    row = {"opts": opts, "seed": a.seed, "steps": a.steps, "n": a.n, "subset_seed": a.subset_seed,
           "plan_acc_train": round(pa, 2), **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in diag.items()},
           "epsilon_rel": m.extra_state["epsilon_rel"], "prepare_s": round(prep_s, 1), "prepare_cpu_s": round(prep_cpu, 1),
           "potentials_s": round(fit_s, 1), "potentials_cpu_s": round(fit_cpu, 1),
           "score_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
