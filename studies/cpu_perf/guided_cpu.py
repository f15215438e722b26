"""Classifier-free guidance on the CPU: one batched call of 2N rows against two calls of N rows.

    python studies/cpu_perf/guided_cpu.py [THREADS] [N] [REPS]

The OTCS digits `cpu` score network (UNet base 16, one block, mults 1-2-2, 28x28, embedded condition, velocity
output, null condition) in eval mode, random weights. Prints milliseconds per guided evaluation of N images for
both layouts, and the unguided N-row call for reference, each the median of REPS after one warm-up, taken in
alternation so that a busy machine slows all of them alike. Nothing here is a test.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from bench.diffusion import VPSDE, Guided, NullCondition, VOutput
from bench.nn import UNet


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    threads = int(argv[0]) if argv else torch.get_num_threads()
    n = int(argv[1]) if len(argv) > 1 else 500
    reps = int(argv[2]) if len(argv) > 2 else 5
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet(1, 1, base=16, mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(), cond_mode="embed",
                cond_channels=1, image_size=28)
    net = NullCondition(VOutput(unet, VPSDE()), (1, 28, 28)).eval()
    guided = Guided(net, 3.0)
    x, c, t = torch.randn(n, 1, 28, 28), torch.randn(n, 1, 28, 28), torch.rand(n)

    def split() -> torch.Tensor:
        e_c = net(x, t, c).float()
        e_u = net(x, t, net.null.expand(n, -1, -1, -1)).float()
        return e_c + guided.scale * (e_c - e_u)

    calls = {"guided, one call of 2N rows": lambda: guided(x, t, c),
             "guided, two calls of N rows": split,
             "unguided, one call of N rows": lambda: net(x, t, c)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        ref = guided(x, t, c)
        assert torch.allclose(ref, split(), atol=1e-4), "the two layouts disagree"
        for k in range(reps + 1):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                if k:  # the first round warms up
                    times[name].append((time.perf_counter() - t0) * 1000)
    print(f"threads {threads}, N = {n}, median of {reps} (ms per evaluation of N images):")
    for name, ts in times.items():
        print(f"  {name:32s} {statistics.median(ts):9.1f}   (min {min(ts):.1f}, max {max(ts):.1f})")


if __name__ == "__main__":
    main()
