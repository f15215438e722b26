#!/usr/bin/env python
"""Learning-rate study of the shared target score model on the `cpu` budget, chosen on training writers only.

The diffusion rows (OTCS, DDIB, EGSDE, SCONES, DPM-OT) all train a base-16 UNet by denoising score matching for a
few thousand steps on the CPU, and OTCS's first cpu run could not generate after 3,000 steps at lr 2e-4. This
script measures how fast that network learns at several learning rates, on data the test split never sees:

* the Chinese-MNIST training writers are split by suite: suites 1-70 fit the model, suites 71-80 validate;
* for each lr, the target score model (``bench.scoremodel.ScoreModel`` with the method's own `cpu` options:
  warm-up, gradient clip, EMA, eps-MSE weighting) is trained for ``--steps`` steps, and every ``--every`` steps
  the EMA weights are scored by the held-out eps-MSE (t uniform on [t_eps, T], the DSM loss a sampler relies on;
  fixed noise draws, so every lr and step sees the same validation problem);
* at the end, 16 DDIM-25 samples per lr are written to a grid for a look: two rows per lr (in the order
  given), the first without x0 clipping, the second with it (same latents).

The rule (studies/score_lr/README.md): the lr with the lowest held-out eps-MSE at the last step is the `cpu`
default of every VP-SDE score model.

    BENCH_DATA=../shared/data python studies/score_lr/score_lr_study.py --lrs 2e-4,5e-4,1e-3,2e-3 --steps 1000 \
        --out studies/score_lr/unconditional_1000
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torchvision

from bench.data import resolve_root
from bench.diffusion import dsm_loss, sample_ddim
from bench.methods.ddib import DDIB
from bench.context import FitContext
from bench.datasets.digits import DigitsTask

VALIDATION_SUITES = range(71, 81)


@torch.no_grad()
def held_out_mse(model, y: torch.Tensor, repeats: int = 4, batch: int = 500) -> float:
    """Mean eps-MSE of the EMA weights on ``y`` (canvas images), t ~ U[t_eps, T], fixed draws."""
    g = torch.Generator().manual_seed(1234)
    total, n = 0.0, 0
    for _ in range(repeats):
        for a in range(0, len(y), batch):
            per = dsm_loss(model.ema, y[a:a + batch], model.sde, weighting="sigma2", generator=g, reduce=False)
            total, n = total + float(per.sum()), n + len(per)
    return total / n


def main(argv=None) -> int:
    a = study_args(argv, __doc__, lrs="2e-4,5e-4,1e-3,2e-3", steps=1000, every=250, outputs="curve.csv, samples.png")

    data = DigitsTask().load(resolve_root(None), 0, budget="cpu")
    suites = data.extra["target_train_suites"]
    val = torch.isin(suites, torch.tensor(list(VALIDATION_SUITES)))
    y_fit, y_val = data.target_train[~val], data.target_train[val]
    print(f"fit on {len(y_fit)} target training images (suites 1-70), validate on {len(y_val)} (suites 71-80)")

    rows, samples = [], []
    for lr in [float(s) for s in a.lrs.split(",")]:
        torch.manual_seed(0)
        m = DDIB(budget="cpu", score_lr=lr, score_steps=a.steps)
        run = FitContext(None, device="cpu", seed=0, budget="cpu", progress=False)
        run.method = m
        m.setup(data, run)
        model = m.target_model
        yv = model.prep(y_val)
        t0 = time.perf_counter()

        def probe(loop, step, model=model, yv=yv, lr=lr, t0=t0):
            mse = held_out_mse(model, yv)
            rows.append({"lr": lr, "step": step, "held_out_mse": round(mse, 5),
                         "minutes": round((time.perf_counter() - t0) / 60, 2)})
            print(f"lr {lr:g} step {step:5d}: held-out eps-MSE {mse:.4f}", flush=True)

        run.probe, run.probe_loops = probe, {"target-score": a.every}
        model.fit(m, run, y_fit, m.options, "target-score")
        for clip in (False, True):  # DDIM-25 from the same latents, without and with x0 clipping
            g = torch.Generator().manual_seed(7)
            x = sample_ddim(model, (16, *model.work_shape), model.sde, 25, generator=g, clip_x0=clip)
            samples.append(model.unprep(x))

    grid = torchvision.utils.make_grid(torch.cat(samples), nrow=16, normalize=True, value_range=(-1, 1), pad_value=1)
    torchvision.utils.save_image(grid, a.out / "samples.png")
    write_curve(rows, a.out, a.steps)
    return 0


def study_args(argv, doc: str, lrs: str, steps: int, every: int, outputs: str, extra=None) -> argparse.Namespace:
    """The command line every lr study shares (``extra(parser)`` adds a study's own options); sets the thread
    count and creates the output folder."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", default=lrs)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--every", type=int, default=every)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help=f"folder: {outputs}")
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    return a


def write_curve(rows: list[dict], out: Path, steps: int) -> float:
    """Write the probe rows to out/curve.csv and print (and return) the lr with the lowest held-out eps-MSE
    at the last step: the study's rule."""
    with open(out / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    last = {r["lr"]: r["held_out_mse"] for r in rows if r["step"] == steps}
    best = min(last, key=last.get)
    print(f"lowest held-out eps-MSE at step {steps}: lr {best:g} ({last[best]:.4f})")
    return best


if __name__ == "__main__":
    raise SystemExit(main())
