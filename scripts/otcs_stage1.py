#!/usr/bin/env python
"""OTCS stage I on digits alone: how fast the potentials converge and how good their plan is.

Runs OTCS's stage I (``prepare_ot`` + ``fit_potentials``, the method's own code) for one setting and,
every ``--every`` steps, measures on the full OT training sets (60,010 x 8,010 pairs):
  - the marginal violations E_x|E_y H - 1| and E_y|E_x H - 1| (< 0.1 = converged, issue 8's rule),
  - stored entries per row of H at the 0.1 threshold and the share of empty rows,
  - plan_acc_train: % of pi_hat(.|x)'s mass on targets of x's class, on 2,000 class-balanced MNIST
    *training* sources (for choosing settings; the test split is never used for that),
  - plan_acc_test on the cpu evaluation subset (reported, never used for choices).
Appends one CSV line per checkpoint to --out (created with a header).

    python scripts/otcs_stage1.py --opt epsilon_rel=2e-5 --steps 10000 --every 2500 --out results/digits/stage1.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench import ot
from bench.data import resolve_root
from bench.datasets.digits import DigitsTask, load_mnist, plan_accuracy
from bench.methods.otcs import OTCS
from bench.context import FitContext


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opt", action="append", default=[], help="OTCS option KEY=VALUE (JSON value)")
    p.add_argument("--task-opt", action="append", default=[], help="digits task option KEY=VALUE")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--every", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/digits/stage1.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    def parse(items):
        out = {}
        for item in items:
            k, v = item.split("=", 1)
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                out[k] = v
        return out

    opts, task_opts = parse(a.opt), parse(a.task_opt)
    task = DigitsTask(**task_opts)
    data = task.load(resolve_root(None), a.seed, budget="cpu")
    m = OTCS(budget="cpu", **{"ot_steps": a.steps, **opts})
    run = FitContext(None, device="cpu", seed=a.seed, budget="cpu", progress=False)
    run.method = m
    torch.manual_seed(a.seed)
    m.setup(data, run)
    m.prepare_ot(data, run)

    mn = load_mnist(resolve_root(None))
    rng = np.random.default_rng(12345)
    tr = np.sort(np.concatenate([rng.permutation(np.nonzero(mn["train_y"] == c)[0])[:200] for c in range(10)]))
    src_train, lab_train = data.source_train[tr], data.source_train_labels[tr]
    t_start = time.perf_counter()
    fit_s = [0.0]

    def probe(loop: str, step: int) -> None:
        fit_s[0] = time.perf_counter() - t_start - probe.spent
        t0 = time.perf_counter()
        P = m._prob
        us, vs = m.potentials()
        cols = torch.arange(P.m)
        full = ot.sparse_compatibility(us, vs, lambda i0, i1: P.xi_block(torch.arange(i0, i1), cols),
                                       P.eps_n, threshold=float("inf"), block_rows=256)  # marginals only
        mx, my = full.marginal_violation()
        rows = torch.randperm(P.n - P.k, generator=torch.Generator().manual_seed(7))[:2000]  # H's sparsity, sampled
        H = ot.sparse_compatibility(us[rows], vs, lambda i0, i1: P.xi_block(rows[i0:i1], cols), P.eps_n,
                                    threshold=0.1, block_rows=256)
        pa_tr = plan_accuracy(m, src_train, lab_train, data.target_train, data.target_train_labels, "cpu")
        pa_te = plan_accuracy(m, data.source_test, data.source_test_labels, data.target_train,
                              data.target_train_labels, "cpu")
        row = {"options": json.dumps(opts, sort_keys=True), "task_options": json.dumps(task_opts, sort_keys=True),
               "seed": a.seed, "step": step, "total_steps": a.steps, "epsilon": m.extra_state["epsilon"],
               "epsilon_rel": m.extra_state["epsilon_rel"], "tau": m.extra_state.get("tau"),
               "marginal_x": round(mx, 4), "marginal_y": round(my, 4),
               "nnz_per_row": round(len(H.col) / len(rows), 2),
               "empty_rows_pct": round(100 * len(H.empty_rows()) / len(rows), 2),
               "kept_mass": round(H.kept_mass, 4), "plan_acc_train": round(pa_tr, 2), "plan_acc_test": round(pa_te, 2),
               "fit_s": round(fit_s[0], 1), "probe_s": round(time.perf_counter() - t0, 1)}
        probe.spent += time.perf_counter() - t0
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with open(out, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        print(row, flush=True)

    probe.spent = 0.0
    run.probe, run.probe_loops = probe, {"otcs-stage1-potentials": a.every}
    m.fit_potentials(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
