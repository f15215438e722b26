"""The diffusion and flow rows of Table 1 together (issue 13): ReFlow, DDIB, EGSDE and SCONES resume in every
stage, run on the digits task through `bench run` (smoke budget, tiny options), and share the `cpu` score lr.

Each method's toy checks against its paper are in its file (tests/test_reflow.py, test_ddib.py, test_egsde.py,
test_scones.py).  The shared plugin contract (tests/test_contract.py) covers shapes, determinism, save/load and
resume for all four.
"""
from __future__ import annotations

import json

import pytest
import torch

from _helpers import transport as _transport
from bench.datasets.toy import Toy2D
from bench.registry import methods
from bench.testing import fit_until_killed


# -- every stage resumes -----------------------------------------------------------------------------
RESUMABLE = {  # a few steps in every loop, on the 2-D task
    "reflow": {"reflow": 1, "flow_steps": 12, "reflow_pairs": 64},
    "ddib": {"score_steps": 12, "ddim_steps": 5},
    "egsde": {"score_steps": 12, "cls_steps": 12, "sde_steps": 5},
    "scones": {"score_steps": 12, "ot_steps": 12, "levels": 3},
}


def _fit_in(directory, name, data, kill_after=None):
    """Fit with a checkpoint after every step; with ``kill_after``, stop right after that many checkpoints
    (as a kill would) and return None."""
    cls = methods()[name]
    return fit_until_killed(cls, data, directory, {**cls.test_options, **RESUMABLE[name]}, kill_after)[0]


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_a_fit_killed_in_any_stage_resumes_to_the_same_model(name, tmp_path, one_thread):
    data = Toy2D().load(None, 0)
    whole = _fit_in(tmp_path / "whole", name, data)
    x = data.source_test[:16]
    expected = _transport(whole, x)
    for cut in (5, 17, 30):  # early in the first loop, in a later loop, past the last one
        d = tmp_path / f"cut{cut}"
        assert _fit_in(d, name, data, kill_after=cut) is None or cut >= 30
        resumed = _fit_in(d, name, data)
        torch.testing.assert_close(_transport(resumed, x), expected, rtol=0, atol=0)
        assert resumed.diagnostics() == whole.diagnostics()


# -- all four on digits through `bench run` ------------------------------------------------------------
TINY_DIGITS = {  # seconds of training each: a plumbing check of the whole pipeline, not a quality run
    "reflow": ["flow_steps=3", "flow_batch=8", "ode_steps=2", "straightness_n=8"],
    "ddib": ["score_steps=3", "score_batch=8", "ddim_steps=2", "cycle_n=8"],
    "egsde": ["score_steps=3", "score_batch=8", "cls_steps=3", "cls_batch=8", "cls_width=8", "sde_steps=2"],
    "scones": ["score_steps=3", "score_batch=8", "ot_steps=3", "potential_hidden=32", "levels=2",
               "n_steps_each=1"],
}


@pytest.mark.slow
def test_all_four_run_on_digits_through_bench_run(tmp_path, run_bench):
    """The plumbing on the real task: `bench run` trains, transports, scores and stores a row for each, with
    the bound terms each method reports. Tiny --opt settings and 30 evaluation sources (FID on the CPU
    dominates a smoke run)."""
    out = tmp_path / "runs"
    opts = ["--opt", "unet_base=8"] + [a for name, kv in TINY_DIGITS.items() for o in kv for a in ("--opt", f"{name}.{o}")]
    run_bench("run", "--methods", "reflow,ddib,egsde,scones", "--task", "digits", "--budget", "smoke",
              "--out", str(out), "--no-progress", *opts, eval_per_class=3)
    for name, key in [("reflow", "bound_straightness"), ("ddib", "bound_cycle_rmse"),
                      ("egsde", None), ("scones", "bound_marginal_x")]:
        row = json.loads(next((out / "digits" / name).glob("smoke-seed0*/row.json")).read_text())
        assert row["fid_n"] == 30 and 0.0 <= row["acc"] <= 100.0 and row["nfe"] >= 1, name
        assert key is None or key in row, (name, sorted(row))
        assert row["options"]["unet_base"] == 8, name


def test_cpu_score_lr_is_the_measured_winner_and_only_on_cpu():
    """The `cpu` lr of the score models (OTCS's stage II too) is the lowest held-out eps-MSE of the committed
    studies, and only the `cpu` budget uses it."""
    import csv
    from pathlib import Path

    from bench.registry import get_method
    from bench.scoremodel import CPU_SCORE_LR

    # studies/score_lr: the unconditional score models' study, and OTCS's own for its conditional stage II
    for study in ("unconditional_2000", "otcs_stage2"):
        rows = list(csv.DictReader(open(Path(__file__).parents[1] / "studies/score_lr" / study / "curve.csv")))
        last = max(int(r["step"]) for r in rows)
        best = min((r for r in rows if int(r["step"]) == last), key=lambda r: float(r["held_out_mse"]))
        assert float(best["lr"]) == CPU_SCORE_LR, study
    for name, key in (("ddib", "score_lr"), ("egsde", "score_lr"), ("scones", "score_lr"), ("dpmot", "lr"),
                      ("otcs", "lr")):
        cls = get_method(name)
        assert cls.resolve_options("cpu", {})[key] == CPU_SCORE_LR, name
        for budget in ("smoke", "fast", "paper"):
            assert cls.resolve_options(budget, {})[key] == 2e-4, (name, budget)
