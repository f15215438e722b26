#!/usr/bin/env python
"""DPM-OT's own claim: few-step generation with an OT expressway vs a plain ancestral sampler.

Fits DPM-OT on a task (its unconditional target score model and latent set; checkpointed in
OUT/run so a rerun resumes), then generates target-domain images from a Gaussian prior with
the DPM-OT sampler (prior -> semi-discrete OT map onto the latent set at t_M -> k reverse steps)
for each k in --nfes, and with the plain ancestral sampler from pure noise for each count in
--baseline, all with the same EMA score model.  Writes OUT/generation.csv and OUT/generation.md
with FID and the mode-mixture share (task classifier's max softmax probability < 0.5).

    python studies/dpmot_generation/dpmot_generation.py --task digits --budget fast --n 2000
    python studies/dpmot_generation/dpmot_generation.py --task digits --budget smoke --n 64 --baseline 20   # CPU check
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from bench.api import BenchError, EvalContext
from bench.data import cache_dir as default_cache, resolve_root
from bench.diffusion import sample_ddim
from bench.methods.dpmot import DPMOT, reverse_steps
from bench.registry import get_task
from bench.context import FitContext, pick_device, seed_everything
from bench.semidiscrete import SemiDiscreteOT
from bench.api import TaskData
from typing import Any


def generation_experiment(method: DPMOT, data: TaskData, task, ctx, nfes=(5, 10, 20),
                          baseline_steps=(100, 1000), n: int = 1000, batch: int = 500,
                          ot_steps: int | None = None, ot_batch: int | None = None,
                          ot_lr: float | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Unconditional generation with the fitted DPM-OT score model, two ways, same network.

    * DPM-OT: z ~ N(0, I) -> semi-discrete OT map (fitted here, Gaussian prior onto the method's
      latent set at t_M) -> ``k`` reverse steps from t_M, for each k in ``nfes``;
    * baseline: the plain ancestral (DDPM) sampler from pure noise at t = T with ``baseline_steps``.

    Each row: sampler, nfe, the task's FID columns (``task.fid(outputs, ctx)``), and the
    "mode mixture" share: fraction of samples whose task-classifier max softmax probability is
    below 0.5 (``task.classifier(ctx)`` returns logits).
    """
    with torch.enable_grad():  # a task may train (and cache) its classifier on first use
        classifier = task.classifier(ctx)
    with torch.no_grad():
        return _generation_rows(method, task, ctx, classifier, nfes, baseline_steps, n, batch,
                                ot_steps, ot_batch, ot_lr, seed)


def _generation_rows(method, task, ctx, classifier, nfes, baseline_steps, n, batch, ot_steps, ot_batch,
                     ot_lr, seed):
    dev = method.device
    ot_steps = ot_steps or method.options["ot_steps"]
    ot_batch = ot_batch or method.options["ot_batch"]
    ot_lr = ot_lr or method.options["ot_lr"]
    shape = method.work_shape

    g = torch.Generator(device=dev).manual_seed(seed)
    prior_ot = SemiDiscreteOT(method.ot.targets.reshape(-1, *shape).clone()).to(dev)
    prior_ot.fit(lambda k, gen: torch.randn((k, *shape), generator=gen, device=dev),
                 steps=int(ot_steps), batch=int(ot_batch), lr=float(ot_lr), generator=g)
    masses = prior_ot.cell_masses(torch.randn((max(4096, 4 * len(prior_ot.targets)), *shape),
                                              generator=g, device=dev))
    ot_err = float((masses - prior_ot.weights).abs().max())

    def generate(make) -> torch.Tensor:
        outs = []
        for s in range(0, n, batch):
            outs.append(method._unprep(make(min(batch, n - s))).float().cpu())
        return torch.cat(outs)

    def score(outputs: torch.Tensor) -> dict[str, Any]:
        probs = []
        for s in range(0, len(outputs), batch):
            logits = classifier(outputs[s:s + batch].to(ctx.device))
            probs.append(torch.softmax(logits.float(), dim=1).max(1).values.cpu())
        conf = torch.cat(probs)
        row = {"mode_mixture": float((conf < 0.5).double().mean()),
               "mean_max_prob": float(conf.double().mean())}
        row.update(task.fid(outputs, ctx))
        return row

    rows: list[dict[str, Any]] = []
    common = {"n": n, "t_M": method.t_M, "seed": seed, "latents": len(prior_ot.targets)}
    for k in nfes:
        def dpm_ot(m, k=k):
            z = torch.randn((m, *shape), generator=g, device=dev)
            return reverse_steps(method.ema, prior_ot.map(z), method.sde, method.t_M, int(k),
                                 method.options["sampler"], g)
        rows.append({"sampler": f"dpm-ot ({method.options['sampler']})", "nfe": int(k),
                     "ot_mass_err": ot_err, **common, **score(generate(dpm_ot))})
    for k in baseline_steps:
        def ancestral(m, k=k):
            return sample_ddim(method.ema, (m, *shape), method.sde, int(k), generator=g, eta=1.0)
        rows.append({"sampler": "ancestral", "nfe": int(k), **common, **score(generate(ancestral))})
    return rows



def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits")
    p.add_argument("--budget", default="fast", choices=["smoke", "cpu", "fast", "paper"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for score training (CUDA)")
    p.add_argument("--n", type=int, default=2000, help="generated images per row")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--nfes", default="5,10,20", help="DPM-OT reverse steps after the OT map")
    p.add_argument("--baseline", default="10,100,1000",
                   help="ancestral sampler step counts from pure noise (10 = the same NFE as DPM-OT)")
    p.add_argument("--opt", action="append", default=[], help="DPM-OT option KEY=VALUE (JSON value)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, help="default studies/dpmot_generation/out/<task>-<budget>-s<seed>")
    a = p.parse_args(argv)

    options = {}
    for item in a.opt:
        if "=" not in item:
            raise BenchError(f"--opt {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    out = Path(a.out or f"studies/dpmot_generation/out/{a.task}-{a.budget}-s{a.seed}")
    out.mkdir(parents=True, exist_ok=True)

    task = get_task(a.task)()
    if not (hasattr(task, "fid") and hasattr(task, "classifier")):
        raise BenchError(f"task {a.task!r} has no fid/classifier helpers; use an image task such as digits")
    root = resolve_root(a.data_root)
    cache = default_cache()
    dev = pick_device(a.device)
    seed_everything(a.seed)
    data = task.load(root, a.seed, budget=a.budget)
    method = DPMOT(budget=a.budget, **options)
    method.check_setting(data)
    run = FitContext(out / "run", device=dev, seed=a.seed, budget=a.budget, bf16=a.bf16)
    run.method = method
    method.setup(data, run)
    method.to(dev)
    if run.restore():
        print(f"resumed from {out / 'run' / 'checkpoint.pt'} {run.progress}")
    method.fit(data, run)
    run.checkpoint()
    fit_s = sum(run.timings.values())  # restored with the checkpoint, so it counts resumed work too

    ctx = EvalContext(cache_dir=cache, device=dev, budget=run.budget, seed=a.seed, method=method,
                      data_root=root)
    t0 = time.perf_counter()
    rows = generation_experiment(method, data, task, ctx, nfes=_ints(a.nfes), baseline_steps=_ints(a.baseline),
                                 n=a.n, batch=a.batch, seed=a.seed)
    gen_s = time.perf_counter() - t0
    for r in rows:
        r.update({"task": a.task, "budget": a.budget, "device": str(dev), "fit_s": round(fit_s, 1),
                  "generation_s": round(gen_s, 1), "options": json.dumps(method.options, sort_keys=True)})
    df = pd.DataFrame(rows)
    df.to_csv(out / "generation.csv", index=False)
    cols = [c for c in ("sampler", "nfe", "fid", "fid_n", "mode_mixture", "mean_max_prob", "t_M", "latents",
                        "ot_mass_err") if c in df]
    md = df[cols].to_markdown(index=False, floatfmt=".4g")
    header = (f"DPM-OT generation on {a.task} ({a.budget} budget, seed {a.seed}, {dev}); "
              f"mode mixture = share with max softmax < 0.5\n\n")
    (out / "generation.md").write_text(header + md + "\n")
    print(header + md)
    print(f"wrote {out / 'generation.csv'} and {out / 'generation.md'}")
    run.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
