"""Time per image of the digits `cpu` score network (unconditional) by rows per call, on the CPU.

    python studies/cpu_perf/unet_rows_cpu.py [THREADS] [REPS] [--pause]

The network DDIB, EGSDE, SCONES, ReFlow and DPM-OT sample with on digits under the `cpu` budget
(``bench.scoremodel.network``: UNet base 16, one block, mults 1-2-2, 28x28, no attention), random weights,
eval mode, no gradient. 1,000 images go through ``bench.diffusion.in_rows`` at 1,000 / 500 / 250 / 128 / 64
rows per call; each figure is the median of REPS rounds (after one warm-up round), the sizes taken in
alternation so that a busy machine slows all of them alike. ``--pause`` stops every other `bench run` /
`bench eval` process (SIGSTOP) while timing and resumes it after. Nothing here is a test.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from _paused import paused_jobs

from bench.diffusion import in_rows
from bench.scoremodel import network

ROWS = (1000, 500, 250, 128, 64)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    pause = "--pause" in argv
    argv = [a for a in argv if a != "--pause"]
    threads = int(argv[0]) if argv else torch.get_num_threads()
    reps = int(argv[1]) if len(argv) > 1 else 3
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, work = network((1, 28, 28), {"unet_base": 16, "unet_mults": [1, 2, 2], "unet_blocks": 1,
                                      "unet_attention": []})
    net.eval()
    x, t = torch.randn(1000, *work), torch.rand(1000)
    times: dict[int, list[float]] = {r: [] for r in ROWS}
    with paused_jobs(pause), torch.no_grad():
        for k in range(reps + 1):
            for r in ROWS:
                t0 = time.perf_counter()
                in_rows(net, x, t, rows=r)
                if k:
                    times[r].append((time.perf_counter() - t0) / len(x) * 1000)
    print(f"threads {threads}, 1,000 images, median of {reps} (ms per image and network call):")
    for r, ts in times.items():
        print(f"  rows per call {r:5d}: {statistics.median(ts):.2f}   (min {min(ts):.2f}, max {max(ts):.2f})")


if __name__ == "__main__":
    main()
