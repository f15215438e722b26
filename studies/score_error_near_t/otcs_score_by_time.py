#!/usr/bin/env python
"""Where in time an OTCS score model is wrong: eps-MSE and the implied x0 error per diffusion time.

Loads RUN_DIR's checkpoint (OTCS, digits), draws 256 training pairs by resampling-by-compatibility, and for each
t in a fixed list prints the noise-prediction error E||eps_hat - z||^2 / D of the EMA and the raw weights and
the data-prediction error E||x0_hat - y||^2 / D, x0_hat = (x_t - sigma eps_hat) / alpha, which is what a sampler
steps along. An eps error that is small in absolute terms near T is multiplied by sigma / alpha (~150 at T).

    BENCH_DATA=../shared/data python studies/score_error_near_t/otcs_score_by_time.py runs/digits/otcs/cpu-seed0-*
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import ot
from bench.data import resolve_root
from bench.methods.otcs import OTCS
from bench.runner import load_run

TIMES = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    loaded = load_run(a.run_dir, data_root=resolve_root(None))
    m, data, run = loaded.method, loaded.data, loaded.run
    if not isinstance(m, OTCS):
        raise SystemExit(f"{a.run_dir} is a {m.name} run; this script reads otcs runs")
    m.prepare_ot(data, run)
    g = torch.Generator().manual_seed(0)
    i, j = ot.resample_by_compatibility(m._H(), a.pairs, generator=g, rows=m.train_rows)
    y0, cond = m._pad(m._prob.yt[j]), m._cond(m._prob.xs[i])
    print(f"{'t':>6s}  {'eps-MSE ema':>11s}  {'eps-MSE raw':>11s}  {'x0-MSE ema':>10s}")
    with torch.no_grad():
        for tv in TIMES:
            t = torch.full((len(y0),), tv)
            z = torch.randn(y0.shape, generator=g)
            xt = m.sde.perturb(y0, t, z)
            out = []
            for net in (m.ema, m.score):
                eps = net(xt, t, cond)
                out.append((float((eps - z).pow(2).mean()),
                            float(((xt - m.sde.sigma(t[:1]) * eps) / m.sde.alpha(t[:1]) - y0).pow(2).mean())))
            print(f"{tv:6.3f}  {out[0][0]:11.5f}  {out[1][0]:11.5f}  {out[0][1]:10.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
