"""Draw the digits task's data: MNIST 0-9 above processed Chinese-MNIST 0-9, then the guiding pairs.

    python scripts/digits_grid.py [--data-root DIR] [--seed 0] [--out results/digits/data_grid.png]

Row 1: the first MNIST test image of each class 0-9.  Row 2: the first Chinese-MNIST test
image of each class (after the MNIST-style normalisation of bench.datasets.digits).
Rows 3-4: the 10 guiding pairs for the seed (MNIST source above its Chinese-MNIST partner).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.datasets.digits import DigitsTask


def _row(images) -> np.ndarray:
    tiles = [np.pad(((im.squeeze(0).numpy() + 1) * 127.5).round().astype(np.uint8), 2, constant_values=60)
             for im in images]
    return np.concatenate(tiles, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--out", default="results/digits/data_grid.png")
    args = ap.parse_args()

    data = DigitsTask().load(args.data_root, args.seed, cache_dir=args.cache_dir)
    first = lambda x, y: [x[int((y == k).nonzero()[0, 0])] for k in range(10)]
    rows = [_row(first(data.source_test, data.source_test_labels)),
            _row(first(data.target_test, data.target_test_labels)),
            _row(data.pairs[0]), _row(data.pairs[1])]
    gap = np.full((8, rows[0].shape[1]), 255, np.uint8)
    grid = np.concatenate([rows[0], rows[1], gap, rows[2], rows[3]], 0)
    img = Image.fromarray(grid).resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.NEAREST)
    label_w = 150
    canvas = Image.new("L", (img.width + label_w, img.height), 255)
    canvas.paste(img, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    h = 32 * args.scale
    for i, text in enumerate(["MNIST test", "Chinese-MNIST test"]):
        draw.text((6, i * h + h // 2 - 6), text, fill=0)
    off = 2 * h + 8 * args.scale
    for i, text in enumerate([f"pairs seed {args.seed}: MNIST", "pairs: Chinese-MNIST"]):
        draw.text((6, off + i * h + h // 2 - 6), text, fill=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
