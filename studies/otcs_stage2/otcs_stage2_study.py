#!/usr/bin/env python
"""Which stage-II setting makes OTCS's score model follow its condition? Training data only.

The `cpu` OTCS score model uses its source weakly and hardly at all at t >= 0.7, where a sampler lays down the
numeral's shape (studies/otcs_stage2/README.md, "Does the score model use its condition?"), so Acc sits at chance
below plan_acc. This script fits stage I once (OTCS's `cpu` options, seed 0) and then trains one fresh stage-II
network per variant (``name:option=value,...``, OTCS options such as ``output=v`` or ``loss_weighting=v``) for
``--steps`` steps with the method's own ``fit_score``. Each variant is scored on the source rows OTCS holds out of
stage II (MNIST *training* images, never the test split):

* the condition-use check of otcs_condition_use.py (beside this file) (held-out eps-MSE with own vs shuffled source, per t,
  against the exact mixture's gain; d_cond / d_noise of samples);
* validation Acc: the run's sampler on ``--val`` held-out rows (class-balanced by their MNIST training labels),
  classified by the task's digits classifier, next to the plan's own class share on the same rows (val plan_acc):
  a score model that follows pi_hat(.|x) reaches Acc ~ val plan_acc.

The rule (studies/otcs_stage2/README.md): the variant with the highest validation Acc; the per-t gains say why.
``--stage1 relations=spread`` sets options of the shared stage I (and of every variant); a variant trained with
``cond_drop`` > 0 is sampled once per ``--guidance`` scale w (classifier-free guidance); the condition-use check
samples with the variant's own ``guidance`` option (0 unless given). Each result names the judge's sha256 and
arch (results before 2026-12-01 were scored by the noise-fragile cnn16-v1).

    BENCH_DATA=../shared/data python studies/otcs_stage2/otcs_stage2_study.py --steps 2000 \
        --variant eps: --variant v-output:output=v --variant v-loss:output=v,loss_weighting=v \
        --out studies/otcs_stage2/objective
    BENCH_DATA=../shared/data python studies/otcs_stage2/otcs_stage2_study.py --steps 3000 --stage1 relations=spread \
        --variant cfg-v:cond_drop=0.1,output=v,loss_weighting=v --guidance 0,1,3 --out studies/otcs_stage2/guidance
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.data import resolve_root
from bench.datasets.digits import DigitsTask, plan_accuracy
from bench.methods.otcs import OTCS
from bench.cli import _parse_value as parse_value
from bench.context import FitContext
from otcs_condition_use import condition_use  # this folder is on sys.path when run as a script
from otcs_lr_study import fit_stage1


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        opts[k.strip()] = parse_value(v.strip())
    return name, opts


def val_rows(m: OTCS, labels: torch.Tensor, n: int, seed: int = 7) -> torch.Tensor:
    """Class-balanced held-out source rows (MNIST training images only, not the appended guiding pairs)."""
    rows = m.hold_rows[m.hold_rows < len(labels)].cpu()
    g = torch.Generator().manual_seed(seed)
    rows = rows[torch.randperm(len(rows), generator=g)]
    per = n // 10
    picked = [rows[labels[rows] == k][:per] for k in range(10)]
    return torch.cat(picked)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="name:option=value,... (OTCS options)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--stage1", default="", help="option=value,... for the shared stage I and every variant")
    p.add_argument("--guidance", default="0", help="comma-separated guidance scales for variants with cond_drop > 0")
    p.add_argument("--val", type=int, default=200, help="held-out source rows sampled for the validation Acc")
    p.add_argument("--ot-steps", type=int, default=None, help="stage-I steps (default: the cpu budget's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="folder: results.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in a.variant]

    clf, judge = DigitsTask()._classifier(resolve_root(None), None, "cpu")
    stage1 = parse_variant(":" + a.stage1)[1]
    scales = [float(w) for w in a.guidance.split(",")]
    data, m, run, H = fit_stage1(a.steps, a.ot_steps, **stage1)
    labels = data.source_train_labels
    rows = val_rows(m, labels, a.val)
    xs = m._prob.xs[rows]
    y_lab = labels[rows]
    plan = plan_accuracy(m, xs, y_lab, data.target_train, data.target_train_labels, "cpu")
    print(f"val rows {len(rows)}: val plan_acc {plan:.1f} %", flush=True)

    out_file = a.out / "results.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    base = dict(m.options)
    for name, opts in variants:
        torch.manual_seed(0)
        m.options.clear()
        m.options.update(base)
        m.options.update(opts)
        m.setup(data, run)          # a fresh stage-II network and EMA; H and the OT problem are kept
        r2 = FitContext(None, device="cpu", seed=0, budget="cpu", progress=False)
        r2.method = m
        t1 = time.perf_counter()
        m.fit_score(H, r2)
        fit_min = (time.perf_counter() - t1) / 60
        use = condition_use(m, pairs=1024, samples=64)
        guided = []
        for w in (scales if m.options["cond_drop"] > 0 else [0.0]):
            m.options["guidance"] = w
            t2 = time.perf_counter()
            y = m.transport(xs, generator=torch.Generator().manual_seed(11))
            with torch.no_grad():
                pred = clf(y).argmax(1)
            acc = 100.0 * float((pred == y_lab).float().mean())
            hist = torch.bincount(pred, minlength=10).tolist()
            guided.append({"guidance": w, "val_acc": acc, "pred_hist": hist,
                           "sample_min": round((time.perf_counter() - t2) / 60, 2)})
            torch.save(y, a.out / f"{name}.w{w:g}.samples.pt")
            print(f"{name} {opts} w={w:g}: fit {fit_min:.1f} min, val Acc {acc:.1f} % (plan {plan:.1f} %), "
                  f"predicted classes {hist}, d_cond/d_noise {use['d_cond'] / use['d_noise']:.3f}", flush=True)
        res = {"options": opts, "stage1": stage1, "steps": a.steps, "fit_min": round(fit_min, 2),
               "sample_min": guided[0]["sample_min"], "val_n": len(rows), "val_acc": guided[0]["val_acc"],
               "val_plan_acc": plan, "pred_hist": guided[0]["pred_hist"], "guided": guided,
               "judge_sha256": judge["sha256"], "judge_arch": judge["arch"], **use}
        results[name] = res
        print("   t     gain %   exact gain %   eps-MSE own", flush=True)
        for r in use["per_t"]:
            print(f"  {r['t']:4.2f}  {r['gain_pct']:7.2f}  {r['exact_gain_pct']:12.2f}  {r['eps_mse_own']:.2e}", flush=True)
        torch.save(m.ema.state_dict(), a.out / f"{name}.ema.pt")
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
