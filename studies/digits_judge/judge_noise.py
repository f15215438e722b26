#!/usr/bin/env python
"""Does the digits classifier read the glyph or the pixel noise around it?

Prints the cached (or freshly trained) digits judge's accuracy on the 2,000 Chinese-MNIST test images with
Gaussian pixel noise of several std added (clamped to [-1, 1], fixed seed), and re-scores saved sample files
of studies/otcs_stage2/otcs_stage2_study.py (200 held-out rows, 20 per class in class order) with it.

    BENCH_DATA=../shared/data python studies/digits_judge/judge_noise.py studies/otcs_stage2/guidance/*.samples.pt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.data import resolve_root
from bench.datasets.digits import DigitsTask
from bench.metrics.classifier import noisy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="*", type=Path, help="study sample files (N, 1, 28, 28), N/10 per class in order")
    p.add_argument("--std", default="0,0.02,0.05,0.1,0.2")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    task = DigitsTask()
    clf, rec = task._classifier(resolve_root(None), None, "cpu")
    print(f"judge {rec['arch']} sha256 {rec['sha256'][:12]}...: test acc {rec['test_acc']:.2f} %", flush=True)
    data = task.load(resolve_root(None), 0, budget="cpu")

    def score(y, labels):
        with torch.no_grad():
            pred = torch.cat([clf(y[i:i + 500]).argmax(1) for i in range(0, len(y), 500)])
        return 100.0 * float((pred == labels).double().mean()), torch.bincount(pred, minlength=10).tolist()

    for s in (float(v) for v in a.std.split(",")):
        acc, hist = score(noisy(data.target_test, s), data.target_test_labels)
        print(f"real test images + noise std {s:g}: acc {acc:.2f} %, predicted classes {hist}")
    for f in a.samples:
        y = torch.load(f)
        acc, hist = score(y, torch.arange(10).repeat_interleave(len(y) // 10))
        print(f"{f}: acc {acc:.1f} %, predicted classes {hist}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
