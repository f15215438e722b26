#!/usr/bin/env python
"""Re-sample a finished EGSDE digits run with the energy terms switched on and off, to tell where its outputs
come from: the target score model (SDEdit from t0 without guidance), the realism term (lambda_s), the
faithfulness term (lambda_i), or both (the run's own setting).

Loads RUN_DIR's checkpoint with the run's options, draws the first 16 test sources with each setting (the same
noise for all), prints the share of background pixels (|y + 1| < 0.1) of each next to the target test images',
and writes a grid: sources, one row per setting, then 16 target test images.

    BENCH_DATA=../shared/data python studies/egsde_guidance/egsde_guidance.py runs/digits/egsde/cpu-seed0-* --out guidance.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

from bench.data import resolve_root
from bench.methods.egsde import EGSDE
from bench.runner import load_run


def background(y: torch.Tensor) -> float:
    return 100 * float(((y + 1).abs() < 0.1).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    loaded = load_run(a.run_dir, data_root=resolve_root(None))
    m, data = loaded.method, loaded.data
    if not isinstance(m, EGSDE):
        raise SystemExit(f"{a.run_dir} is a {m.name} run; this script reads egsde runs")
    o = dict(m.options)
    x = data.source_test[:16]
    settings = [("run's own", {}), ("no guidance (SDEdit)", {"lambda_s": 0.0, "lambda_i": 0.0}),
                ("realism only", {"lambda_i": 0.0}), ("faithfulness only", {"lambda_s": 0.0}),
                ("from noise, t0 = 1", {"t0": 1.0, "lambda_s": 0.0, "lambda_i": 0.0})]
    rows = [x]
    for name, change in settings:
        m.options.update(o)
        m.options.update(change)
        y = m.transport(x, torch.Generator().manual_seed(1)).clamp(-1, 1)
        rows.append(y)
        print(f"{name:22s} background {background(y):5.1f} %  mean {float(y.mean()):+.3f}")
    m.options.update(o)
    yt = data.target_test[:256]
    print(f"{'target test':22s} background {background(yt):5.1f} %  mean {float(yt.mean()):+.3f}")
    rows.append(data.target_test[:16])
    torchvision.utils.save_image(torch.cat(rows) * 0.5 + 0.5, a.out, nrow=16)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
