#!/usr/bin/env python
"""Re-sample a finished (or checkpointed) OTCS digits run with several samplers, to tell a weak score model
from a weak sampler.

Loads RUN_DIR's checkpoint with the run's own options and draws the first 16 test sources with: the run's
transport (reverse SDE, its sde_steps, x0 clipping, final denoise), DDIM with 100 steps (deterministic), the
reverse SDE with 1000 steps, and the reverse SDE with the raw (non-EMA) weights. Prints the share of background
pixels (|y + 1| < 0.1) of each next to the target test images', and writes a grid: sources, the four samplers,
then 16 target test images.

    BENCH_DATA=../shared/data python studies/score_error_near_t/otcs_samplers.py runs/digits/otcs/cpu-seed0-* --out samplers.png
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision

from bench.data import resolve_root
from bench.diffusion import sample_ddim, sample_sde
from bench.methods.otcs import OTCS
from bench.runner import load_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    loaded = load_run(a.run_dir, data_root=resolve_root(None))
    m, data = loaded.method, loaded.data
    if not isinstance(m, OTCS):
        raise SystemExit(f"{a.run_dir} is a {m.name} run; this script reads otcs runs")
    x = data.source_test[:16]
    cond, shape = m._cond(x), (16, *data.shape)
    g = torch.Generator().manual_seed(1)
    samplers = {
        "run's transport": lambda: m.transport(x, g),
        "DDIM 100": lambda: sample_ddim(m.ema, shape, m.sde, 100, cond=cond, generator=g),
        "SDE 1000": lambda: sample_sde(m.ema, shape, m.sde, 1000, cond=cond, generator=g, clip_x0=True, denoise=True),
        "SDE, raw weights": lambda: sample_sde(m.score, shape, m.sde, m.nfe, cond=cond, generator=g, clip_x0=True,
                                               denoise=True),
    }
    rows = [x]
    for name, draw in samplers.items():
        t = time.time()
        y = draw().clamp(-1, 1)
        rows.append(y)
        print(f"{name:18s} {time.time() - t:6.1f} s  background {100 * float(((y + 1).abs() < 0.1).float().mean()):5.1f} %")
    yt = data.target_test[:256]
    print(f"{'target test':18s}          background {100 * float(((yt + 1).abs() < 0.1).float().mean()):5.1f} %")
    rows.append(data.target_test[:16])
    torchvision.utils.save_image(torch.cat(rows) * 0.5 + 0.5, a.out, nrow=16)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
