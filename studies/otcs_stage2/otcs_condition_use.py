#!/usr/bin/env python
"""Does an OTCS score model use its condition? Two label-free checks on a trained run.

1. Held-out conditional eps-MSE per diffusion time, with each pair's own source as the condition and with the
   sources shuffled among the pairs (same y, t and noise). A model that ignores its condition scores the same
   on both; one that follows pi_hat(.|x) scores worse with the wrong source.
2. Sampling: for N held-out source rows x_a and partners x_b (the same rows rolled by one), draw y(x_a, s1),
   y(x_b, s1) and y(x_a, s2) with the run's sampler, s1 / s2 two noise seeds. d_cond = RMS(y(x_a,s1) -
   y(x_b,s1)) is how far the output moves when only the condition changes, d_noise = RMS(y(x_a,s1) - y(x_a,s2))
   when only the noise changes. d_cond ~ 0 means the condition is ignored.
The reference for check 1 is the same comparison made with the exact noise predictor of the noised finite
mixture pi_hat(.|x) = sum_j w_ij delta(y_j) (the one J_CSM is measured against): its gain is how much the
plan's conditionals differ between sources, i.e. the most a perfect score model could gain from the condition.
The pairs come from the rows OTCS held out of stage II (training images, never the test split).

    BENCH_DATA=../shared/data python studies/otcs_stage2/otcs_condition_use.py runs/digits/otcs/cpu-seed0-*
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench import ot
from bench.data import resolve_root
from bench.diffusion import mixture_eps
from bench.methods.otcs import OTCS
from bench.runner import load_run

TIMES = (0.01, 0.1, 0.3, 0.5, 0.7, 0.9)


def _exact_eps(H: ot.SparseCompatibility, yt: torch.Tensor, rows: torch.Tensor, y_t: torch.Tensor,
               a: float, s: float) -> torch.Tensor:
    """eps*(y_t) = (y_t - a E[y | y_t, row]) / s for the noised mixture of each query's H row (flat vectors)."""
    out = torch.empty_like(y_t)
    for r in torch.unique(rows).tolist():
        q = torch.nonzero(rows == r).flatten()
        a0, b0 = int(H.crow[r]), int(H.crow[r + 1])
        Y = yt[H.col[a0:b0]]
        w = H.val[a0:b0].double()
        out[q] = mixture_eps(y_t[q], Y, (w / w.sum()).float(), a, s)
    return out


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).flatten(1).mean(1).sqrt().mean())


@torch.no_grad()
def condition_use(m: OTCS, pairs: int = 1024, samples: int = 64, seed: int = 0) -> dict:
    """The two checks above for a fitted OTCS (images or vectors)."""
    g = torch.Generator(device=m.device).manual_seed(seed)
    H = m._H()
    rows = m.hold_rows if len(m.hold_rows) else m.train_rows
    i, j = ot.resample_by_compatibility(H, pairs, generator=g, rows=rows)
    P = m._prob
    y0 = m._pad(P.yt[j])
    cond = m._cond(P.xs[i])
    perm = torch.randperm(len(i), generator=g, device=cond.device)
    shuffled = cond[perm]
    yflat = m._pad(P.yt).flatten(1).float()
    out: dict = {"pairs": int(len(i)), "per_t": []}
    for tv in TIMES:
        t = torch.full((len(y0),), tv, device=y0.device)
        z = torch.randn(y0.shape, generator=g, device=y0.device)
        xt = m.sde.perturb(y0, t, z)
        mse = [float((m.ema(xt, t, c).float() - z).pow(2).mean()) for c in (cond, shuffled)]
        a, s = float(m.sde.alpha(t[:1])), float(m.sde.sigma(t[:1]))
        zf, xf = z.flatten(1), xt.flatten(1).float()
        ideal = [float((_exact_eps(H, yflat, r, xf, a, s) - zf).pow(2).mean()) for r in (i, i[perm])]
        out["per_t"].append({"t": tv, "eps_mse_own": mse[0], "eps_mse_shuffled": mse[1],
                             "gain_pct": 100.0 * (mse[1] - mse[0]) / mse[1],
                             "exact_eps_mse_own": ideal[0], "exact_eps_mse_shuffled": ideal[1],
                             "exact_gain_pct": 100.0 * (ideal[1] - ideal[0]) / max(ideal[1], 1e-30)})
    src_rows = rows[torch.randperm(len(rows), generator=g, device=rows.device)[:samples]]
    xa = P.xs[src_rows]
    xb = torch.roll(xa, 1, dims=0)

    def draw(x, s):
        return m.transport(x, generator=torch.Generator(device=m.device).manual_seed(s))
    ya1, yb1, ya2 = draw(xa, 1), draw(xb, 1), draw(xa, 2)
    out["samples"] = int(len(xa))
    out["d_cond"], out["d_noise"] = _rms(ya1, yb1), _rms(ya1, ya2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results (one entry per run) to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = {}
    for rd in a.run_dirs:
        loaded = load_run(rd, data_root=resolve_root(None))
        m, data, run = loaded.method, loaded.data, loaded.run
        if not isinstance(m, OTCS):
            raise SystemExit(f"{rd} is a {m.name} run; this script reads otcs runs")
        m.prepare_ot(data, run)
        r = condition_use(m, a.pairs, a.samples)
        results[str(rd)] = r
        print(f"{rd}: {r['pairs']} held-out pairs")
        print(f"{'t':>5s}  {'eps-MSE own x':>13s}  {'shuffled x':>10s}  {'gain %':>6s}  "
              f"{'exact own':>9s}  {'exact shuffled':>14s}  {'exact gain %':>12s}")
        for row in r["per_t"]:
            print(f"{row['t']:5.2f}  {row['eps_mse_own']:13.5f}  {row['eps_mse_shuffled']:10.5f}  {row['gain_pct']:6.2f}  "
                  f"{row['exact_eps_mse_own']:9.5f}  {row['exact_eps_mse_shuffled']:14.5f}  {row['exact_gain_pct']:12.2f}")
        print(f"samples ({r['samples']} sources): d_cond {r['d_cond']:.4f}  d_noise {r['d_noise']:.4f}  "
              f"ratio {r['d_cond'] / max(r['d_noise'], 1e-12):.3f}")
    if a.json:
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
