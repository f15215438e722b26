#!/usr/bin/env python
"""Learning curves from the probe points of run directories (``bench run --probe-every N``).

    python scripts/plot_curves.py runs/digits/otcs/cpu-seed0-* --metrics acc,cfd --out curve.png

One panel per metric, one line per run directory (label: method/seed); x = step of the method's
probe loop.  Points come from log.jsonl records with stage "probe".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--metrics", default="acc,cfd")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    metrics = [m for m in a.metrics.split(",") if m]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    found = 0
    for rundir in a.runs:
        log = rundir / "log.jsonl"
        if not log.exists():
            continue
        points = [json.loads(x) for x in log.read_text().splitlines() if '"stage": "probe"' in x]
        if not points:
            continue
        found += 1
        cfg = json.loads((rundir / "config.json").read_text()) if (rundir / "config.json").exists() else {}
        label = f"{cfg.get('method', rundir.parent.name)} seed {cfg.get('seed', '?')}"
        for ax, m in zip(axes[0], metrics):
            ax.plot([q["step"] for q in points], [q.get(m) for q in points], marker="o", label=label)
    if not found:
        raise SystemExit("no probe points found: run `bench run ... --probe-every N` first")
    for ax, m in zip(axes[0], metrics):
        ax.set_xlabel("training step (probe loop)")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    n, subset = points[-1].get("n"), points[-1].get("subset", "evenly spread")  # older logs: evenly spread
    fig.suptitle(f"learning curves ({n} {subset} evaluation sources per point)", fontsize=9)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
