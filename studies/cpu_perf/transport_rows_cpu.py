"""Time per image and sampler step of a trained run's transport, by rows per call (CPU).

    python studies/cpu_perf/transport_rows_cpu.py RUN_DIR [STEPS] [--pause]

Restores RUN_DIR (`bench.runner.load_run`), cuts its sampler to STEPS steps (default 4) and transports 1,000
test sources in calls of 1,000 / 500 / 250 / 125 / 64 rows, twice. ``--pause`` stops every other `bench run` /
`bench eval` process (SIGSTOP) while timing and resumes it after, so that a long job can stay running. Prints
milliseconds per image and step. Nothing here is a test. (For OTCS runs: its sampler's step count is the option
``sde_steps``, and its own 128-row chunking is switched off here.)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from _paused import paused_jobs

from bench.runner import load_run


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    pause = "--pause" in argv
    argv = [a for a in argv if a != "--pause"]
    steps = int(argv[1]) if len(argv) > 1 else 4
    p = load_run(Path(argv[0]), data_root=Path(os.environ.get("BENCH_DATA", "../shared/data")))
    m = p.method
    m.options["sde_steps"] = steps
    import bench.methods.otcs as otcs  # time the raw rows per call: switch OTCS's own 128-row chunking off
    otcs.cpu_chunked = lambda net, device, rows=128: net
    x = p.sources[:1000]
    with paused_jobs(pause):
        m.transport(x[:250], generator=torch.Generator().manual_seed(0))  # warm-up
        for _ in range(2):
            for n in (1000, 500, 250, 125, 64):
                t0 = time.perf_counter()
                for s in range(0, len(x), n):
                    m.transport(x[s:s + n], generator=torch.Generator().manual_seed(0))
                ms = (time.perf_counter() - t0) / steps / len(x) * 1000
                print(f"rows per call {n:5d}: {ms:.2f} ms per image and step", flush=True)

if __name__ == "__main__":
    main()
