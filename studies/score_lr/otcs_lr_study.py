#!/usr/bin/env python
"""Learning-rate study of OTCS's stage II (the conditional score model) on the `cpu` budget, training data only.

score_lr_study.py (beside this file) chose the lr of the unconditional score models (DDIB, EGSDE, SCONES, DPM-OT) by their
held-out eps-MSE. OTCS's stage-II network is the same UNet with the source image concatenated as a condition,
trained on pairs (x_i, y_j) resampled from the stage-I compatibility H, without a learning-rate warm-up. Whether
the same lr suits it is measured here, by the same rule:

* stage I (potentials, H) is fitted once with OTCS's own `cpu` options and seed 0;
* OTCS's held-out source rows (``holdout``: training rows never used in stage II, no test data) give the
  validation problem: a fixed set of pairs (x_i, y_j) drawn from pi_hat(.|x_i) by resampling, fixed t and noise;
* for each lr a fresh network is trained for ``--steps`` stage-II steps (the method's own ``fit_score``) and every
  ``--every`` steps its EMA weights are scored by the held-out conditional eps-MSE (t uniform, the loss OTCS trains).

The lr with the lowest held-out eps-MSE at the last step wins (studies/score_lr/README.md).

    BENCH_DATA=../shared/data python studies/score_lr/otcs_lr_study.py --lrs 2e-4,2e-3 --steps 2000 \
        --out studies/score_lr/otcs_stage2
"""
from __future__ import annotations

import time

import torch

from bench import ot
from bench.data import resolve_root
from bench.datasets.digits import DigitsTask
from bench.diffusion import dsm_loss
from bench.methods.otcs import OTCS
from bench.context import FitContext
from score_lr_study import study_args, write_curve  # this folder is on sys.path when run as a script


@torch.no_grad()
def held_out_mse(m: OTCS, pairs: tuple[torch.Tensor, torch.Tensor], seed: int = 1234, batch: int = 500) -> float:
    """Mean conditional eps-MSE of the EMA weights on fixed held-out pairs, t ~ U[t_eps, T], fixed draws."""
    g = torch.Generator().manual_seed(seed)
    xs, yt = m._prob.xs, m._prob.yt
    i, j = pairs
    total = 0.0
    for a in range(0, len(i), batch):
        per = dsm_loss(m.ema, m._pad(yt[j[a:a + batch]]), m.sde, cond=m._cond(xs[i[a:a + batch]]),
                       weighting="sigma2", generator=g, reduce=False)
        total += float(per.sum())
    return total / len(i)


def fit_stage1(steps: int, ot_steps: int | None = None, **options):
    """OTCS with its `cpu` options (``steps`` stage-II steps; ``options`` override others), seed 0, on digits:
    stage I and H fitted once, so that studies can train fresh stage-II networks on the same plan.
    Returns (data, method, run, H)."""
    data = DigitsTask().load(resolve_root(None), 0, budget="cpu")
    m = OTCS(budget="cpu", steps=steps, **({"ot_steps": ot_steps} if ot_steps else {}), **options)
    run = FitContext(None, device="cpu", seed=0, budget="cpu", progress=False)
    run.method = m
    m.setup(data, run)
    t0 = time.perf_counter()
    m.prepare_ot(data, run)
    m.fit_potentials(run)
    H = m.compatibility(run)
    print(f"stage I + H: {(time.perf_counter() - t0) / 60:.1f} min; {len(m.hold_rows)} held-out source rows, "
          f"{len(m.train_rows)} training rows", flush=True)
    return data, m, run, H


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--pairs", type=int, default=2000, help="held-out (x_i, y_j) pairs in the validation set")
        p.add_argument("--ot-steps", type=int, default=None, help="stage-I steps (default: the cpu budget's)")

    a = study_args(argv, __doc__, lrs="2e-4,2e-3", steps=2000, every=500, outputs="curve.csv", extra=extra)

    data, m, run, H = fit_stage1(a.steps, a.ot_steps)
    g = torch.Generator().manual_seed(99)
    val_pairs = ot.resample_by_compatibility(H, a.pairs, generator=g, rows=m.hold_rows)

    rows = []
    for lr in [float(s) for s in a.lrs.split(",")]:
        torch.manual_seed(0)
        m.setup(data, run)          # a fresh stage-II network and EMA (H and the OT problem are kept)
        m.options["lr"] = lr
        r2 = FitContext(None, device="cpu", seed=0, budget="cpu", progress=False)
        r2.method = m
        t1 = time.perf_counter()

        def probe(loop, step, lr=lr, t1=t1):
            mse = held_out_mse(m, val_pairs)
            rows.append({"lr": lr, "step": step, "held_out_mse": round(mse, 5),
                         "minutes": round((time.perf_counter() - t1) / 60, 2)})
            print(f"lr {lr:g} step {step:5d}: held-out conditional eps-MSE {mse:.4f}", flush=True)

        r2.probe, r2.probe_loops = probe, {"otcs-stage2-score": a.every}
        m.fit_score(H, r2)

    write_curve(rows, a.out, a.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
