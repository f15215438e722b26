"""The four headline methods (OTCS, NOT, KNOT, DPM-OT) end to end on the real digits data: `bench run` on the
smoke budget must finish and store a complete row and grid for each (smoke is not a quality run).

They run in this process and are scored on 30 sources (FID against a 100-image reference: ``run_bench``'s
shrunk smoke evaluation); the README's main job runs smoke's full 250-source evaluation, as a newcomer does.
"""
from __future__ import annotations

import json

import pytest


def _row(out, method):
    return json.loads(next((out / "digits" / method).glob("smoke-seed0*/row.json")).read_text())


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, run_bench):
    """The four headline methods through one in-process `bench run` on smoke, scored on 30 sources (FID
    on the CPU dominates a smoke run)."""
    out = tmp_path_factory.mktemp("e2e-methods") / "runs"
    run_bench("run", "--methods", "otcs,not,knot,dpmot", "--task", "digits", "--budget", "smoke", "--out", str(out),
              "--no-progress", eval_per_class=3)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["otcs", "not", "knot", "dpmot"])
def test_method_runs_on_digits_smoke(method, method_runs):
    row = _row(method_runs, method)
    assert row["fid_n"] == 30 and row["n_eval"] == 30 and 0.0 <= row["acc"] <= 100.0 and row["nfe"] >= 1
    assert row["budget"] == "smoke" and row["timings"]["fit_s"] > 0
    if method == "otcs":
        for key in ("bound_marginal_x", "bound_marginal_y", "bound_sqrt_jcsm", "bound_prior_w2"):
            assert key in row and row[key] >= 0.0
        assert 0.0 <= row["plan_acc"] <= 100.0
    assert list((method_runs / "digits" / method).glob("smoke-seed0*/grid.png"))
