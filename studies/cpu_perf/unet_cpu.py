"""The score UNet on the CPU: one DSM training step (batch 64) and one inference pass (500 images).

    python studies/cpu_perf/unet_cpu.py THREADS SIDE BASE [cl|n] [compile]

e.g. ``python studies/cpu_perf/unet_cpu.py 1 28 16 n`` (studies/cpu_perf/perf_cpu.md lists the measured settings).
Prints milliseconds per training step (mean of 10 after 3 warm-up steps) and per 500-image forward pass
(mean of 3). Nothing here is a test.
"""
from __future__ import annotations

import sys
import time

import torch

from bench.diffusion import VPSDE, dsm_loss
from bench.nn import UNet


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    threads, side, base = int(argv[0]), int(argv[1]), int(argv[2])
    cl = len(argv) > 3 and argv[3] == "cl"
    compiled = len(argv) > 4 and argv[4] == "compile"
    torch.set_num_threads(threads)
    net = UNet(1, 1, base=base, mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(), cond_mode="embed",
               cond_channels=1, image_size=side)
    fmt = torch.channels_last if cl else torch.contiguous_format
    net = net.to(memory_format=fmt)
    fwd = torch.compile(net) if compiled else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    sde = VPSDE()
    x = torch.randn(64, 1, side, side).contiguous(memory_format=fmt)
    c = torch.randn(64, 1, side, side).contiguous(memory_format=fmt)
    t_start = time.perf_counter()
    for i in range(13):
        if i == 3:
            warm = time.perf_counter() - t_start
            t0 = time.perf_counter()
        loss = dsm_loss(fwd, x, sde, cond=c, weighting="sigma2")
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_ms = (time.perf_counter() - t0) / 10 * 1000
    xb, cb = torch.randn(500, 1, side, side), torch.randn(500, 1, side, side)
    with torch.no_grad():
        fwd(xb, torch.rand(500), cb)
        t0 = time.perf_counter()
        for _ in range(3):
            fwd(xb, torch.rand(500), cb)
    infer_ms = (time.perf_counter() - t0) / 3 * 1000
    print(f"threads={threads} side={side} base={base} channels_last={cl} compile={compiled}: "
          f"train step {train_ms:.0f} ms, inference 500 images {infer_ms:.0f} ms (warm-up {warm:.1f} s)")


if __name__ == "__main__":
    main()
