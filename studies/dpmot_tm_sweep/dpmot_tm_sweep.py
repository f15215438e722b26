#!/usr/bin/env python
"""DPM-OT's latent level t_M: how much class information survives the OT expressway.

MNIST -> MNIST (source: MNIST test images, latents: MNIST train images, one fixed subset each),
both diffused to t_M on the VP schedule DPM-OT uses (beta 0.1..20), the semi-discrete OT map
(bench.semidiscrete, quadratic cost) fitted from the diffused sources onto the diffused latents,
then the share of sources whose assigned latent has the source's class.  At t_M -> 0 the map is
pixel-space OT (classes mostly kept); at large t_M the noise drowns the image and the share falls
to chance (10 %), i.e. DPM-OT becomes an unconditional generator.  Labels are read only here.

    python studies/dpmot_tm_sweep/dpmot_tm_sweep.py --out studies/dpmot_tm_sweep      # ~5-10 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.data import resolve_root
from bench.datasets.digits import load_mnist
from bench.diffusion import VPSDE
from bench.nn import pad_to
from bench.semidiscrete import SemiDiscreteOT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", default="0,0.002,0.05,0.1,0.2,0.3,0.5", help="comma-separated t_M values")
    p.add_argument("--latents", type=int, default=1000)
    p.add_argument("--sources", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300, help="dual steps of the semi-discrete solver")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="studies/dpmot_tm_sweep")
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    m = load_mnist(resolve_root(a.data_root))
    g = np.random.default_rng(a.seed)
    li = g.choice(len(m["train_x"]), a.latents, replace=False)
    si = g.choice(len(m["test_x"]), a.sources, replace=False)

    def unit(x):
        return pad_to(torch.from_numpy(x.astype(np.float32) / 127.5 - 1).unsqueeze(1), 32)

    lat0, lat_y = unit(m["train_x"][li]), torch.from_numpy(m["train_y"][li])
    src0, src_y = unit(m["test_x"][si]), torch.from_numpy(m["test_y"][si])
    sde = VPSDE(0.1, 20.0)
    rows = []
    for t_m in [float(v) for v in a.t.split(",")]:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(a.seed + 1)
        tt = torch.tensor(t_m)
        alpha, sigma = float(sde.alpha(tt)), float(sde.sigma(tt))
        lat = alpha * lat0 + sigma * torch.randn(lat0.shape, generator=gen)
        ot = SemiDiscreteOT(lat)

        def sampler(n, gen_, t_m=t_m):
            x = src0[torch.randint(0, len(src0), (n,), generator=gen_)]
            return alpha * x + sigma * torch.randn(x.shape, generator=gen_)

        ot.fit(sampler, steps=a.steps, batch=a.batch, generator=gen)
        x = alpha * src0 + sigma * torch.randn(src0.shape, generator=gen)
        j = ot.assign(x)
        masses = ot.cell_masses(sampler(8 * a.latents, gen))
        rows.append({"t_M": t_m, "sigma": round(sigma, 4), "same_class_pct": 100.0 * float((lat_y[j] == src_y).double().mean()),
                     "max_cell_mass_err": float((masses - ot.weights).abs().max()),
                     "empty_cells": int((masses == 0).sum()), "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "sweep.csv", index=False)
    head = (f"DPM-OT t_M sweep, MNIST -> MNIST, {a.sources} sources onto {a.latents} latents, "
            f"{a.steps} solver steps (batch {a.batch}), seed {a.seed}; chance = 10 %.\n"
            f"Command: python studies/dpmot_tm_sweep/dpmot_tm_sweep.py {' '.join(argv or [])}\n\n")
    (out / "sweep.md").write_text(head + df.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(head + df.to_markdown(index=False, floatfmt=".4g"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
