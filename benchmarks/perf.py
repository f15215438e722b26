"""Performance benchmark: prints, per method and stage, where the time goes on this device.

    python benchmarks/perf.py --task digits --methods otcs,not --budget fast [--bf16] [--compile]

For each method it fits with every training loop capped at ``--steps`` steps (the networks and
batch sizes are the budget's own), and reports steps/s per loop, peak GPU memory, transport
images/s at the method's NFE; then Inception feature images/s (FID), and for the shared UNet
training step the FLOPs (torch.utils.flop_counter), achieved TFLOP/s and the device's measured
matmul peak (bf16 on CUDA, fp32 on CPU), so the distance to the hardware limit is visible.
Nothing here is a test: it prints figures (and writes them as JSON with --json).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.data import cache_dir, resolve_root
from bench.registry import get_method, get_task
from bench.context import FitContext, pick_device, seed_everything


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dev, dtype, n=4096, reps=20) -> float:
    """Measured dense matmul throughput in TFLOP/s."""
    if dev.type == "cpu":
        n, reps = 1024, 5
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def unet_step(dev, bf16: bool, batch: int, base: int, compile_: bool, reps: int = 10, side: int = 32,
              blocks: int = 2, channels_last: bool = False) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from bench.diffusion import VPSDE, dsm_loss
    from bench.nn import UNet

    net = UNet(1, 1, base=base, cond_mode="embed", cond_channels=1, num_res_blocks=blocks,
               attention_resolutions=(), image_size=side).to(dev)
    if dev.type == "cuda" or channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    sde = VPSDE()
    x = torch.randn(batch, 1, side, side, device=dev)
    c = torch.randn(batch, 1, side, side, device=dev)
    fwd = torch.compile(net) if compile_ else net
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            loss = dsm_loss(fwd, x, sde, cond=c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    for _ in range(2):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t0) / reps
    return {"unet_base": base, "batch": batch, "side": side, "blocks": blocks, "channels_last": channels_last,
            "ms_per_step": 1000 * dt, "gflop_per_step": flops / 1e9, "steps_per_s": 1 / dt,
            "images_per_s": batch / dt, "achieved_tflops": flops / dt / 1e12}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--methods", default="otcs,not,knot,dpmot")
    ap.add_argument("--budget", default="smoke")
    ap.add_argument("--steps", type=int, default=20, help="cap on every training loop")
    ap.add_argument("--transport-n", type=int, default=256)
    ap.add_argument("--fid-n", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--unet-base", type=int, default=64)
    ap.add_argument("--unet-batch", type=int, default=128)
    ap.add_argument("--unet-side", type=int, default=32, help="canvas of the UNet step (28 = unpadded digits)")
    ap.add_argument("--unet-blocks", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true", help="UNet step in channels_last (always on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU (default: cores)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    dev = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = resolve_root(args.data_root)
    report: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "budget": args.budget, "bf16": args.bf16,
                    "compile": args.compile, "threads": torch.get_num_threads(), "methods": {}}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    report["matmul_peak_tflops"] = matmul_peak(dev, dtype)
    print(f"device {report['device']}: measured {dtype} matmul peak {report['matmul_peak_tflops']:.2f} TFLOP/s")

    task = get_task(args.task)()
    data = task.load(root, 0, budget=args.budget)
    for name in [m for m in args.methods.split(",") if m]:
        seed_everything(0)
        method = get_method(name)(budget=args.budget)
        run = FitContext(None, device=dev, seed=0, budget=args.budget, bf16=args.bf16, compile=args.compile,
                  progress=False, step_cap=args.steps)
        run.method = method
        method.setup(data, run)
        method.to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        method.fit(data, run)
        sync(dev)
        fit_s = time.perf_counter() - t0
        stages = {k: {"steps": run.progress.get(k), "seconds": round(v, 3),
                      "steps_per_s": (run.progress.get(k, 0) / v) if v > 0 and run.progress.get(k) else None}
                  for k, v in run.timings.items()}
        x = data.source_test[: args.transport_n].to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(x), 500):
                method.transport(x[i:i + 500], generator=g)
        sync(dev)
        tr = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        report["methods"][name] = {"stages": stages, "fit_s_capped": fit_s, "nfe": method.nfe,
                                   "transport_images_per_s": len(x) / tr, "peak_gpu_gib": peak}
        print(f"\n{name} (NFE {method.nfe}): fit with loops capped at {args.steps} steps took {fit_s:.1f}s")
        for k, v in stages.items():
            sps = f"{v['steps_per_s']:.2f} steps/s" if v["steps_per_s"] else "one-shot"
            print(f"  {k:<24} {v['seconds']:>8.2f}s  {sps}")
        print(f"  transport: {len(x) / tr:.1f} images/s" + (f", peak GPU memory {peak:.2f} GiB" if peak else ""))

    from bench.metrics.fid import fid_features
    imgs = data.target_test[: args.fid_n]
    fid_features(imgs[:8], device=dev, data_root=root, cache_dir=cache_dir())
    sync(dev)
    t0 = time.perf_counter()
    fid_features(imgs, device=dev, data_root=root, cache_dir=cache_dir())
    sync(dev)
    report["fid_features_images_per_s"] = len(imgs) / (time.perf_counter() - t0)
    print(f"\nFID Inception features: {report['fid_features_images_per_s']:.1f} images/s")

    u = unet_step(dev, args.bf16, args.unet_batch, args.unet_base, args.compile, side=args.unet_side,
                  blocks=args.unet_blocks, channels_last=args.channels_last)
    u["fraction_of_peak"] = u["achieved_tflops"] / report["matmul_peak_tflops"]
    report["unet_train_step"] = u
    print(f"UNet (base {u['unet_base']}, {u['side']}x{u['side']}, batch {u['batch']}) DSM train step: "
          f"{u['ms_per_step']:.0f} ms, {u['gflop_per_step']:.2f} GFLOP, {u['images_per_s']:.0f} images/s, "
          f"{1000 * u['achieved_tflops']:.1f} GFLOP/s = {100 * u['fraction_of_peak']:.1f}% of the measured matmul peak "
          f"({1000 * report['matmul_peak_tflops']:.1f} GFLOP/s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
