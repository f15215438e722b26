"""EGSDE's guided transport on the CPU with the energy gradient taken in one call of all rows against
`grad_in_rows` chunks (bench.diffusion.CPU_ROWS rows), on a trained run.

    python studies/cpu_perf/egsde_grad_rows_cpu.py RUN_DIR [STEPS] [--pause]

Restores RUN_DIR (an egsde run, `bench.runner.load_run`), cuts its sampler to STEPS steps (default 6) and
transports the first 500 test sources with the same noise, alternating the two layouts twice. Prints seconds per
sampler step for 500 images and the largest difference between the two outputs. ``--pause`` stops every other
`bench run` / `bench eval` (SIGSTOP) while timing. Nothing here is a test.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import torch
from _paused import paused_jobs

import bench.methods.egsde as egsde
from bench.diffusion import CPU_ROWS, grad_in_rows
from bench.runner import load_run


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    pause = "--pause" in argv
    argv = [a for a in argv if a != "--pause"]
    steps = int(argv[1]) if len(argv) > 1 else 6
    p = load_run(Path(argv[0]), data_root=Path(os.environ.get("BENCH_DATA", "../shared/data")))
    m = p.method
    if m.name != "egsde":
        raise SystemExit(f"{argv[0]} is a {m.name} run; this benchmark reads egsde runs")
    m.options["sde_steps"] = steps
    x = p.sources[:500]
    print(f"{torch.get_num_threads()} threads, {steps} sampler steps, {len(x)} sources", flush=True)
    layouts = {"one call": len(x), f"{CPU_ROWS} rows": CPU_ROWS}
    out = {}
    with paused_jobs(pause):
        egsde.grad_in_rows = functools.partial(grad_in_rows, rows=CPU_ROWS)
        m.transport(x[:64], generator=torch.Generator().manual_seed(0))  # warm-up
        for _ in range(2):
            for name, rows in layouts.items():
                egsde.grad_in_rows = functools.partial(grad_in_rows, rows=rows)
                t0 = time.perf_counter()
                out[name] = m.transport(x, generator=torch.Generator().manual_seed(0))
                print(f"{name:>9}: {(time.perf_counter() - t0) / steps:.2f} s per step", flush=True)
    a, b = out.values()
    print(f"largest |difference| between the layouts' outputs: {float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
