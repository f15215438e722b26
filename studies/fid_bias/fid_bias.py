#!/usr/bin/env python
"""FID's small-sample bias on digits at the n the cpu budget uses, measured, not assumed.

Two samples of one distribution should have FID 0; at finite n they do not. This prints:
  - MNIST test vs MNIST test, two disjoint class-balanced halves, at n = 250, 1000, 2000 each
    (the floor FID reaches with the same distribution on both sides);
  - Chinese-MNIST train writers vs test writers at n = 2000 (new writers, same classes: the best a
    perfect translator could expect against the 2,000-image test reference);
  - MNIST test (n = 2000) vs Chinese-MNIST test (2000): the identity translation.
Inception features of each image set are computed once.

    python studies/fid_bias/fid_bias.py --prep plain --out studies/fid_bias/fid_bias.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.data import cache_dir, resolve_root  # noqa: E402
from bench.metrics.fid import fid_features  # noqa: E402
from bench.metrics.frechet import feature_stats, frechet_distance  # noqa: E402
from bench.host import device_name as _device_name  # noqa: E402
from datasets.digits import DigitsTask, _to_unit, load_mnist  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", default="plain")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="studies/fid_bias/fid_bias.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = resolve_root(None)
    task = DigitsTask(prep=a.prep)
    c = task._chinese_split(root, cache_dir())
    m = load_mnist(root)
    rng = np.random.default_rng(0)
    # two disjoint class-balanced sets of 2,000 MNIST test images (200 per class), in shuffled order
    per_class = [rng.permutation(np.nonzero(m["test_y"] == k)[0]) for k in range(10)]
    halves = [rng.permutation(np.concatenate([ix[:200] for ix in per_class])),
              rng.permutation(np.concatenate([ix[200:400] for ix in per_class]))]
    feats = {
        "mnist_a": fid_features(_to_unit(m["test_x"][halves[0]]), data_root=root, cache_dir=cache_dir()),
        "mnist_b": fid_features(_to_unit(m["test_x"][halves[1]]), data_root=root, cache_dir=cache_dir()),
        "cn_train": fid_features(_to_unit(c["train_x"][rng.permutation(len(c["train_x"]))[:2000]]),
                                 data_root=root, cache_dir=cache_dir()),
        "cn_test": fid_features(_to_unit(c["test_x"]), data_root=root, cache_dir=cache_dir()),
    }

    def fid(x, y):
        return frechet_distance(*feature_stats(x), *feature_stats(y))

    lines = [f"# FID small-sample bias on digits (prep={a.prep}, clean-fid features, measured by studies/fid_bias/fid_bias.py)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {_device_name(torch.device('cpu'))}; the two MNIST sets are "
             "disjoint class-balanced draws (seed 0) from the MNIST test split, n < 2,000 their first n.", "",
             "| comparison | n per side | FID |", "|---|---|---|"]
    for n in (250, 1000, 2000):
        lines.append(f"| MNIST test vs MNIST test (disjoint halves) | {n} | {fid(feats['mnist_a'][:n], feats['mnist_b'][:n]):.2f} |")
    lines.append(f"| Chinese-MNIST train writers vs test writers | 2000 | {fid(feats['cn_train'], feats['cn_test']):.2f} |")
    lines.append(f"| MNIST test vs Chinese-MNIST test (identity) | 2000 | {fid(feats['mnist_a'], feats['cn_test']):.2f} |")
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
